"""MaskCut: normalized cuts on planted feature maps with known objects, exact Ncut values, the
proposer's contract; and the COCO class-agnostic average recall of benchmarks/propose_quality."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils

import importlib
from uplvp_model.proposal.factory import build_proposer
from uplvp_model.proposal.maskcut import MaskCutProposer, maskcut, ncut_value, normalized_cut


def planted(objects: list[tuple[slice, slice]], size: int = 8) -> np.ndarray:
    """[C, size, size] features: e0 on the background, e(i + 1) inside object i."""
    features = np.zeros((len(objects) + 1, size, size))
    features[0] = 1.0
    for i, (rows, cols) in enumerate(objects):
        features[:, rows, cols] = 0.0
        features[i + 1, rows, cols] = 1.0
    return features


def block(rows: slice, cols: slice, size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return mask


def test_ncut_value_by_hand():
    # two pairs joined inside by 1, across by 0.1: cut = 0.2 (two cross edges... each 0.1)
    w = np.array([[0, 1, 0.1, 0], [1, 0, 0, 0.1], [0.1, 0, 0, 1], [0, 0.1, 1, 0]], dtype=float)
    part = np.array([True, True, False, False])
    # assoc(A, V) = 1 + 0.1 + 1 + 0.1 = 2.2 = assoc(B, V); Ncut = 0.2/2.2 + 0.2/2.2
    assert ncut_value(w, part) == pytest.approx(0.4 / 2.2)
    assert ncut_value(w, np.ones(4, bool)) == 2.0
    vector = normalized_cut(w)
    assert ((vector > vector.mean()) == part).all() or ((vector > vector.mean()) == ~part).all()


def test_one_planted_object_is_cut_out_exactly_with_a_score_near_one():
    rows, cols = slice(2, 5), slice(3, 6)
    cuts = maskcut(planted([(rows, cols)]), tau=0.2, num_cuts=1)
    assert len(cuts) == 1
    mask, score = cuts[0]
    assert np.array_equal(mask, block(rows, cols))
    assert score == pytest.approx(1.0, abs=1e-3)


def test_two_planted_objects_come_out_one_per_cut():
    a, b = (slice(1, 3), slice(1, 4)), (slice(5, 7), slice(4, 7))
    cuts = maskcut(planted([a, b]), tau=0.2, num_cuts=2)
    masks = sorted((m for m, _ in cuts), key=lambda m: int(np.argmax(m)))
    assert len(masks) == 2
    assert np.array_equal(masks[0], block(*a)) and np.array_equal(masks[1], block(*b))


def test_a_background_touching_two_corners_is_never_the_object():
    # object wider than half the map: the eigenvector's larger magnitude may sit on either side;
    # whichever, the returned mask must be the object, not the corner-touching background
    rows, cols = slice(1, 7), slice(1, 7)
    mask, _ = maskcut(planted([(rows, cols)]), tau=0.2, num_cuts=1)[0]
    assert np.array_equal(mask, block(rows, cols))


def test_maskcut_proposer_contract():
    with pytest.raises(ValueError, match="no backbone checkpoint given"):
        build_proposer("maskcut", backbone="tiny")
    proposer = build_proposer("maskcut", backbone="tiny", random_weights=True, input_size=64,
                              min_area=4, num_cuts=3, top_k=2, feature_level="layer2")
    assert isinstance(proposer, MaskCutProposer) and proposer.embedding_dim == 32
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
              rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)]
    results = proposer.propose(images)
    assert len(results) == 2 and all(len(r) <= 2 for r in results) and any(results)
    for image, masks in zip(images, results):
        for m in masks:
            assert m.mask.shape == image.shape[:2] and m.mask.sum() >= 4
            assert 0.0 <= m.score <= 1.0 and m.embedding.shape == (32,)
    again = proposer.propose(images)
    assert [[m.score for m in r] for r in again] == [[m.score for m in r] for r in results]
    assert proposer.config()["top_k"] == 2 and proposer.config()["backbone"] == "tiny"


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": encoded["counts"].decode()}


def test_coco_average_recall_on_planted_masks():
    quality = importlib.import_module("tools.propose_quality")
    size = 40
    gt_a = np.zeros((size, size), bool)
    gt_a[0:10, 0:10] = True  # area 100 (small)
    gt_b = np.zeros((size, size), bool)
    gt_b[20:30, 20:30] = True
    pred_b = np.zeros((size, size), bool)
    pred_b[20:30, 20:30] = True
    pred_b[30:32, 20:30] = True  # 100 / 120: IoU 0.833
    coco = {"images": [{"id": 1, "height": size, "width": size, "file_name": "a.png"}],
            "categories": [{"id": 7, "name": "x"}, {"id": 9, "name": "y"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 100.0,
                 "bbox": [0, 0, 10, 10], "segmentation": rle(gt_a)},
                {"id": 2, "image_id": 1, "category_id": 9, "iscrowd": 0, "area": 100.0,
                 "bbox": [20, 20, 10, 10], "segmentation": rle(gt_b)}]}
    rows = [{"image_id": 1, "height": size, "width": size, "score": score,
             "rle_counts": rle(mask)["counts"]} for mask, score in ((gt_a, 0.9), (pred_b, 0.5))]
    ar = quality.coco_average_recall(pd.DataFrame(rows), coco, max_dets=(1, 10))
    # instance a: found at every IoU threshold (1.0); b: at 0.50 ... 0.80 (7 of 10); the
    # masks match across categories (class-agnostic)
    assert ar["AR@10"] == pytest.approx((1.0 + 0.7) / 2)
    assert ar["AR@1"] == pytest.approx(0.5)  # only the best-scored mask (a)
    assert ar["AR_small@10"] == pytest.approx(0.85)
    assert np.isnan(ar["AR_large@10"])  # no large instance


def test_crop_views_are_the_image_and_half_overlapping_crops():
    from uplvp_model.proposal.maskcut import crop_views

    image = np.arange(30 * 60 * 3, dtype=np.uint8).reshape(30, 60, 3)
    views = crop_views(image, 2)
    assert [offset for _, offset in views] == [(0, 0), (0, 0), (0, 20), (10, 0), (10, 20)]
    assert views[0][0] is image and all(v.shape == (20, 40, 3) for v, _ in views[1:])
    assert np.array_equal(views[4][0], image[10:30, 20:60])
    assert len(crop_views(image, 1)) == 1


def test_crops_add_masks_pasted_at_their_place():
    proposer = build_proposer("maskcut", backbone="tiny", random_weights=True, input_size=64,
                              min_area=4, num_cuts=2, top_k=None, feature_level="layer2",
                              nms_iou=1.0, crop_grid=2)
    image = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    whole = build_proposer("maskcut", backbone="tiny", random_weights=True, input_size=64,
                           min_area=4, num_cuts=2, top_k=None, feature_level="layer2",
                           nms_iou=1.0).propose([image])[0]
    masks = proposer.propose([image])[0]
    # the whole image's cuts are among them (nothing suppressed at nms_iou 1), and more
    assert len(masks) > len(whole)
    assert all(any(np.array_equal(w.mask, m.mask) for m in masks) for w in whole)
    assert all(m.mask.shape == (60, 80) for m in masks)
