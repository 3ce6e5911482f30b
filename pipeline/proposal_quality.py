"""How good pseudo masks are against ground-truth instances: matching at a mask IoU
threshold, recall / precision / label accuracy of the masks a filter keeps, and COCO's
class-agnostic mask average recall. Used by ``tools/propose_quality.py`` and by anything
that reports pseudo-mask quality against known instances (the demo's synthetic ground truth).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pipeline.coco import ground_truth_rles
from pipeline.shard_dataset import MaskFilter, kept_rows

SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("small", 0.0, 32.0**2),
    ("medium", 32.0**2, 96.0**2),
    ("large", 96.0**2, float("inf")),
)
SCORE_THRESHOLDS: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7)


@dataclass
class MatchTable:
    """Pseudo masks (P rows) and ground-truth instances (G rows) of a set of images, matched.

    pred_image int64 [P], pred_score float32 [P], pred_area int64 [P] (pixels),
    pred_mask_index int32 [P]: the shard columns of each pseudo mask;
    pred_matched bool [P]: IoU >= the threshold with some ground-truth instance of its image;
    pred_label str [P]: the shard's ``label``; pred_gt_category int64 [P]: the COCO category
    of the instance the mask overlaps most among those it matches (-1 when unmatched).
    gt_category int64 [G] (COCO category id), gt_area float64 [G] (the annotation's ``area``);
    gt_matches: per instance, int64 row numbers (into the pred arrays) of the pseudo masks
    with IoU >= the threshold.
    """

    num_images: int
    pred_image: np.ndarray
    pred_score: np.ndarray
    pred_area: np.ndarray
    pred_mask_index: np.ndarray
    pred_matched: np.ndarray
    pred_label: np.ndarray
    pred_gt_category: np.ndarray
    gt_category: np.ndarray
    gt_area: np.ndarray
    gt_matches: list[np.ndarray]


def match_masks(
    masks: pd.DataFrame,
    gt: dict[int, list[tuple[int, float, dict]]],
    image_sizes: dict[int, tuple[int, int]],
    iou_threshold: float = 0.5,
) -> MatchTable:
    """Match the pseudo masks of ``masks`` (rows of a ``masks/`` shard folder) to ``gt``.

    ``image_sizes``: (height, width) of every ground-truth image; a pseudo mask proposed at
    another size (a ``max_side`` downscale) cannot be compared and raises ``ValueError``.
    """
    masks = masks.sort_values(["image_id", "mask_index"], kind="stable").reset_index(drop=True)
    pred_matched = np.zeros(len(masks), dtype=bool)
    pred_gt_category = np.full(len(masks), -1, dtype=np.int64)
    gt_category: list[int] = []
    gt_area: list[float] = []
    gt_matches: list[np.ndarray] = []
    rows_by_image = masks.groupby("image_id").indices
    for image_id, instances in gt.items():
        rows = np.asarray(rows_by_image.get(image_id, []), dtype=np.int64)
        preds = [
            {"size": [int(masks.at[r, "height"]), int(masks.at[r, "width"])],
             "counts": masks.at[r, "rle_counts"]}
            for r in rows
        ]
        for pred in preds:
            if tuple(pred["size"]) != image_sizes[image_id]:
                raise ValueError(
                    f"image {image_id}: pseudo masks are {pred['size']} but the annotations are "
                    f"{list(image_sizes[image_id])}; rerun propose with a larger max_side"
                )
        if preds and instances:
            iou = np.asarray(
                mask_utils.iou(preds, [rle for _, _, rle in instances], [0] * len(instances))
            ).reshape(len(preds), len(instances))
        else:
            iou = np.zeros((len(preds), len(instances)))
        hits = iou >= iou_threshold  # [p, g]
        pred_matched[rows] = hits.any(axis=1)
        if instances and len(rows):
            best = iou.argmax(axis=1)
            categories = np.asarray([c for c, _, _ in instances], dtype=np.int64)
            pred_gt_category[rows] = np.where(hits.any(axis=1), categories[best], -1)
        for g, (category_id, area, _) in enumerate(instances):
            gt_category.append(category_id)
            gt_area.append(area)
            gt_matches.append(rows[hits[:, g]])
    return MatchTable(
        num_images=len(gt),
        pred_image=masks["image_id"].to_numpy(np.int64),
        pred_score=masks["score"].to_numpy(np.float32),
        pred_area=masks["area"].to_numpy(np.int64),
        pred_mask_index=masks["mask_index"].to_numpy(np.int32),
        pred_matched=pred_matched,
        pred_label=masks["label"].to_numpy(dtype=object),
        pred_gt_category=pred_gt_category,
        gt_category=np.asarray(gt_category, dtype=np.int64),
        gt_area=np.asarray(gt_area, dtype=np.float64),
        gt_matches=gt_matches,
    )


def filter_keep(table: MatchTable, mask_filter: MaskFilter) -> np.ndarray:
    """bool [P]: the pseudo masks ``mask_filter`` keeps (exactly as pre-training selects)."""
    keep = np.zeros(len(table.pred_image), dtype=bool)
    rows = kept_rows(table.pred_image, table.pred_score, table.pred_area,
                     table.pred_mask_index, mask_filter)
    for kept in rows.values():
        keep[kept] = True
    return keep


def recall(table: MatchTable, keep: np.ndarray, instances: np.ndarray | None = None) -> float:
    """Share of ground-truth instances (those selected by bool [G] ``instances``; default all)
    matched by a kept pseudo mask (``keep``: bool [P]); NaN when no instance is selected."""
    found = np.array([keep[m].any() for m in table.gt_matches], dtype=bool)
    if instances is not None:
        found = found[instances]
    return float(found.mean()) if len(found) else float("nan")


def precision(table: MatchTable, keep: np.ndarray) -> float:
    """Share of kept pseudo masks (bool [P] ``keep``) matching some instance; NaN if none kept."""
    return float(table.pred_matched[keep].mean()) if keep.any() else float("nan")


def label_accuracy(table: MatchTable, keep: np.ndarray, names: dict[int, str]) -> float:
    """Share of kept matched pseudo masks whose ``label`` is the category name (``names``: COCO
    id -> name) of the instance they overlap most; NaN when none is kept and matched."""
    matched = keep & table.pred_matched
    if not matched.any():
        return float("nan")
    truth = np.asarray([names[int(c)] for c in table.pred_gt_category[matched]], dtype=object)
    return float((table.pred_label[matched] == truth).mean())


def masks_per_image(table: MatchTable, keep: np.ndarray) -> float:
    return float(keep.sum()) / table.num_images if table.num_images else float("nan")


AR_MAX_DETS: tuple[int, ...] = (10, 20, 50)
AREA_NAMES: tuple[str, ...] = ("all", "small", "medium", "large")


def coco_average_recall(masks: pd.DataFrame, coco: dict,
                        max_dets: Sequence[int] = AR_MAX_DETS) -> dict[str, float]:
    """COCO class-agnostic mask average recall of the pseudo masks ``masks`` (rows of a
    ``masks/`` shard folder: ``image_id``, ``height``, ``width``, ``rle_counts``, ``score``)
    against ``coco``'s instances: ``{"AR@k": ..., "AR_small@k": ...}`` for each k of
    ``max_dets`` and each COCO area range, in [0, 1] (NaN where a range has no instance).

    ``COCOeval(iouType="segm")`` with ``useCats = 0`` (every mask may match every instance),
    ``maxDets = max_dets``; AR@k is the mean over the 10 IoU thresholds of the recall of the
    best k masks per image (by score)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ground_truth = COCO()
    ground_truth.dataset = {"images": coco["images"], "categories": coco["categories"],
                            "annotations": [dict(a) for a in coco["annotations"]]}
    with _quiet():
        ground_truth.createIndex()
    category = int(coco["categories"][0]["id"])
    detections = [
        {"image_id": int(r.image_id), "category_id": category, "score": float(r.score),
         "segmentation": {"size": [int(r.height), int(r.width)], "counts": r.rle_counts}}
        for r in masks.itertuples()
    ]
    out: dict[str, float] = {}
    if not detections:
        return {f"AR{'' if a == 'all' else '_' + a}@{k}": 0.0 for a in AREA_NAMES for k in max_dets}
    with _quiet():
        predicted = ground_truth.loadRes(detections)
        evaluator = COCOeval(ground_truth, predicted, iouType="segm")
        evaluator.params.useCats = 0
        evaluator.params.maxDets = sorted(max_dets)
        evaluator.params.imgIds = sorted(img["id"] for img in coco["images"])
        evaluator.evaluate()
        evaluator.accumulate()
    recall = evaluator.eval["recall"]  # [T, K=1, A, M]; -1 where a range has no instance
    for a, area in enumerate(evaluator.params.areaRngLbl):
        for m, k in enumerate(evaluator.params.maxDets):
            values = recall[:, 0, a, m]
            name = f"AR{'' if area == 'all' else '_' + area}@{k}"
            out[name] = float(values.mean()) if (values > -1).all() else float("nan")
    return out


def _quiet():
    """pycocotools prints progress; keep the report readable."""
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


def quality_against(masks: pd.DataFrame, images: pd.DataFrame, coco: dict,
                    mask_filter: MaskFilter, iou_threshold: float = 0.5) -> dict[str, float]:
    """Pseudo masks of a propose run (its ``masks`` and ``images`` tables) against ``coco``'s
    instances, images matched by file name: masks per image, recall, precision and label
    accuracy at ``iou_threshold``, for every mask and for those ``mask_filter`` keeps."""
    by_name = {img["file_name"]: img["id"] for img in coco["images"]}
    ids = {int(i): by_name[Path(p).name] for i, p in zip(images["image_id"], images["image_path"])}
    masks = masks.assign(image_id=[ids[int(i)] for i in masks["image_id"]])
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    gt = ground_truth_rles(coco)
    gt = {image_id: gt.get(image_id, []) for image_id in set(ids.values())}
    table = match_masks(masks, gt, sizes, iou_threshold)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    every = np.ones(len(table.pred_image), bool)
    kept = filter_keep(table, mask_filter)
    return {"images": table.num_images, "instances": len(table.gt_category),
            "masks_per_image": masks_per_image(table, every), "recall": recall(table, every),
            "precision": precision(table, every),
            "label_accuracy": label_accuracy(table, every, names),
            "kept_masks_per_image": masks_per_image(table, kept),
            "kept_recall": recall(table, kept), "kept_precision": precision(table, kept),
            "kept_label_accuracy": label_accuracy(table, kept, names)}
