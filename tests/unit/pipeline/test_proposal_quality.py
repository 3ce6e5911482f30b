"""pipeline.proposal_quality on planted masks with known answers: matching at IoU 0.5, recall,
precision, label accuracy, masks kept by the pre-training filter, COCO class-agnostic AR."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils

from pipeline.proposal_quality import (
    coco_average_recall,
    filter_keep,
    label_accuracy,
    masks_per_image,
    match_masks,
    precision,
    recall,
)
from pipeline.shard_dataset import MaskFilter

H, W = 20, 20


def box(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask))


# image 1: a square (category 1, "disk") and a bar (category 2, "star"); image 2: one square
GT_MASKS = {1: [(1, box(0, 10, 0, 10)), (2, box(12, 20, 0, 20))], 2: [(1, box(5, 15, 5, 15))]}
# pseudo masks: image 1: the square exactly ("disk", right), the bar's left half (IoU 0.5,
# "disk", wrong label), a miss; image 2: the square shifted by 5 (IoU 50/150: no match)
PREDS = [(1, box(0, 10, 0, 10), 0.9, "disk"), (1, box(12, 20, 0, 10), 0.6, "disk"),
         (1, box(0, 4, 14, 20), 0.4, "star"), (2, box(10, 20, 5, 15), 0.8, "disk")]


def planted():
    gt = {image: [(category, float(mask.sum()), rle(mask)) for category, mask in instances]
          for image, instances in GT_MASKS.items()}
    rows = []
    counts: dict[int, int] = {}
    for image, mask, score, label in PREDS:
        encoded = rle(mask)
        rows.append({"image_id": image, "mask_index": counts.get(image, 0), "height": H,
                     "width": W, "rle_counts": encoded["counts"].decode(), "score": score,
                     "area": int(mask.sum()), "label": label})
        counts[image] = counts.get(image, 0) + 1
    return pd.DataFrame(rows), gt


def test_planted_masks_match_as_computed_by_hand():
    masks, gt = planted()
    table = match_masks(masks, gt, {1: (H, W), 2: (H, W)}, iou_threshold=0.5)
    assert table.pred_matched.tolist() == [True, True, False, False]
    assert table.pred_gt_category.tolist() == [1, 2, -1, -1]
    every = np.ones(4, bool)
    assert recall(table, every) == pytest.approx(2 / 3)
    assert precision(table, every) == pytest.approx(2 / 4)
    names = {1: "disk", 2: "star"}
    assert label_accuracy(table, every, names) == pytest.approx(1 / 2)
    assert masks_per_image(table, every) == pytest.approx(2.0)
    # the pre-training filter (score >= 0.5) drops the 0.4 miss
    keep = filter_keep(table, MaskFilter(min_score=0.5, min_area=1, max_masks=20))
    assert keep.tolist() == [True, True, False, True]
    assert precision(table, keep) == pytest.approx(2 / 3)
    # a subset of the instances (as the per-size rows select them): the bar and image 2's square
    assert recall(table, every, instances=np.array([False, True, True])) == pytest.approx(1 / 2)


def test_a_mask_at_another_size_is_refused():
    masks, gt = planted()
    with pytest.raises(ValueError, match="rerun propose with a larger max_side"):
        match_masks(masks, gt, {1: (H, 2 * W), 2: (H, W)})


def test_class_agnostic_average_recall_of_planted_masks():
    masks, gt = planted()
    coco = {"images": [{"id": i, "height": H, "width": W} for i in GT_MASKS],
            "categories": [{"id": 1, "name": "disk"}, {"id": 2, "name": "star"}],
            "annotations": [{"id": n + 1, "image_id": image, "category_id": category,
                             "segmentation": {"size": [H, W], "counts": r["counts"].decode()},
                             "area": area, "bbox": list(mask_utils.toBbox(r)), "iscrowd": 0}
                            for n, (image, (category, area, r)) in enumerate(
                                (image, inst) for image, insts in gt.items() for inst in insts)]}
    ar = coco_average_recall(masks, coco, max_dets=(1, 10))
    # 10 IoU thresholds 0.50:0.95: the exact square is found at all 10, the half bar (IoU 0.5)
    # only at 0.50, the shifted square never -> (10 + 1 + 0) / (3 instances x 10 thresholds)
    assert ar["AR@10"] == pytest.approx(11 / 30)
    # one mask per image: image 1 keeps its best (the exact square), image 2 its miss
    assert ar["AR@1"] == pytest.approx(10 / 30)
