"""COCO instance-segmentation metrics of COCO results against a ground-truth COCO dict.

``evaluate_predictions(coco_gt, results)`` runs pycocotools' ``COCOeval`` for ``segm`` (mask AP)
and ``bbox`` and returns plain JSON-ready values::

    {
      "segm": {"AP": .., "AP50": .., "AP75": .., "APs": .., "APm": .., "APl": ..},
      "bbox": {...same keys...},
      "per_category": {"segm": [{"category_id", "name", "num_gt", "AP"}, ...], "bbox": [...]},
      "num_images": int, "num_predictions": int,
    }

Values are fractions in [0, 1] as pycocotools computes them (AP: mean over IoU 0.50:0.95 and
101 recall points, at most 100 detections per image); ``None`` (JSON null) where pycocotools
reports -1 because no ground truth falls in that area range or category. Zero predictions are
valid input: every AP with ground truth is 0.0.

As in Detectron2, ``segm`` is scored with the results' ``bbox`` removed, so that pycocotools
takes each detection's area from its mask (the area decides which APs/APm/APl range a
detection belongs to); ``bbox`` is scored from the results' boxes.

Backends (``backend=``): ``"pycocotools"`` (the reference) and ``"faster-coco-eval"`` (its C++
reimplementation, same numbers: ``benchmarks/coco_eval_speed.py``); the default is
faster-coco-eval where it is installed (a core dependency), else pycocotools. Both read the same
pycocotools ``COCO`` objects and fill the same ``eval["precision"]`` array.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.errors import InputError

COCO_BACKENDS = ("pycocotools", "faster-coco-eval")

IOU_TYPES = ("segm", "bbox")
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def ground_truth_coco(coco_gt: dict) -> COCO:
    """A pycocotools ``COCO`` index over a copy of ``coco_gt`` (a validated COCO instances
    dict), with the fields COCOeval needs filled in where missing: ``iscrowd`` 0, ``area`` the
    mask's pixel count, ``bbox`` the mask's tight box."""
    dataset = {key: copy.deepcopy(coco_gt[key]) for key in ("images", "annotations",
                                                             "categories")}
    gt = _quiet(COCO)
    gt.dataset = dataset
    _quiet(gt.createIndex)
    for ann in dataset["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann or "bbox" not in ann:
            rle = gt.annToRLE(ann)
            ann.setdefault("area", float(mask_utils.area(rle)))
            ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
    return gt


def without_images(coco_gt: dict, image_ids: Iterable[int]) -> dict:
    """``coco_gt`` (a COCO instances dict) without the images ``image_ids`` and their
    annotations: the ground truth of the images an evaluation could read."""
    drop = {int(i) for i in image_ids}
    if not drop:
        return coco_gt
    return {**coco_gt,
            "images": [im for im in coco_gt["images"] if int(im["id"]) not in drop],
            "annotations": [a for a in coco_gt.get("annotations", [])
                            if int(a["image_id"]) not in drop]}


def check_results(gt: COCO, results: Sequence[dict]) -> None:
    """:class:`InputError` on the first result whose image, category or mask size does not fit
    the ground truth (pycocotools would fail with a bare assertion or a wrong score)."""
    for i, res in enumerate(results):
        where = f"results[{i}]"
        for key in ("image_id", "category_id", "segmentation", "score"):
            if key not in res:
                raise InputError(f"{where} lacks '{key}'")
        image = gt.imgs.get(res["image_id"])
        if image is None:
            raise InputError(f"{where}.image_id {res['image_id']!r} is not a ground-truth image")
        if res["category_id"] not in gt.cats:
            raise InputError(f"{where}.category_id {res['category_id']!r} is not a "
                             f"ground-truth category")
        size = res["segmentation"].get("size") if isinstance(res["segmentation"], dict) else None
        if size is None or list(size) != [image["height"], image["width"]]:
            raise InputError(f"{where}.segmentation must be RLE of size "
                             f"[{image['height']}, {image['width']}] (image "
                             f"{res['image_id']}), got size {size!r}")


def results_coco(gt: COCO, results: Sequence[dict], iou_type: str) -> COCO:
    """The detections as a pycocotools ``COCO`` (``gt.loadRes``), also for zero results.

    For ``segm`` the results' ``bbox`` is removed first (area then comes from the mask).
    """
    dets = [dict(r) for r in results]
    if iou_type == "segm":
        for det in dets:
            det.pop("bbox", None)
    if dets:
        return _quiet(gt.loadRes, dets)
    res = _quiet(COCO)
    res.dataset = {"images": list(gt.dataset["images"]), "categories":
                   list(gt.dataset["categories"]), "annotations": []}
    _quiet(res.createIndex)
    return res


def available_backends() -> tuple[str, ...]:
    """The :data:`COCO_BACKENDS` installed here, reference first."""
    faster = importlib.util.find_spec("faster_coco_eval") is not None
    return ("pycocotools", "faster-coco-eval") if faster else ("pycocotools",)


def default_backend() -> str:
    """faster-coco-eval where installed, else pycocotools."""
    return available_backends()[-1]


def make_cocoeval(gt: COCO, dt: COCO, iou_type: str, backend: str | None = None):
    """A ``COCOeval`` of ``backend`` (:func:`default_backend` when None) over ``gt`` / ``dt``."""
    backend = backend or default_backend()
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCOeval_faster

        return COCOeval_faster(gt, dt, iouType=iou_type, print_function=lambda *a, **k: None)
    if backend == "pycocotools":
        return COCOeval(gt, dt, iouType=iou_type)
    raise ValueError(f"unknown COCO backend {backend!r}; choose one of {', '.join(COCO_BACKENDS)}")


def run_cocoeval(gt: COCO, dt: COCO, iou_type: str, backend: str | None = None,
                 use_cats: bool = True):
    """``COCOeval`` evaluated, accumulated and summarised (its printing silenced);
    ``use_cats=False``: class-agnostic matching."""
    evaluator = make_cocoeval(gt, dt, iou_type, backend)
    if not use_cats:
        evaluator.params.useCats = 0
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return evaluator


def summary_metrics(evaluator) -> dict[str, float | None]:
    """AP, AP50, AP75, APs, APm, APl from ``evaluator.stats`` (-1 -> None)."""
    return {key: _value(evaluator.stats[i]) for i, key in enumerate(SUMMARY_KEYS)}


def per_category_ap(evaluator, gt: COCO) -> list[dict]:
    """Per category (ascending id): ``{"category_id", "name", "num_gt", "AP"}``.

    AP is the mean of ``eval["precision"][iou, recall, k, area=all, maxDets=last]`` over the
    entries that are not -1; None when the category has no (non-crowd) ground truth.
    """
    precision = evaluator.eval["precision"]
    num_gt = Counter(ann["category_id"] for ann in gt.dataset["annotations"]
                     if not ann["iscrowd"])
    rows = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        rows.append({
            "category_id": int(cat_id),
            "name": gt.cats[cat_id]["name"],
            "num_gt": num_gt[cat_id],
            "AP": float(np.mean(values)) if values.size else None,
        })
    return rows


def evaluate_predictions(coco_gt: dict, results: list[dict],
                         iou_types: Sequence[str] = IOU_TYPES, backend: str | None = None) -> dict:
    """COCO metrics of ``results`` (COCO results dicts with RLE ``segmentation``, ``bbox``,
    ``score``) against ``coco_gt`` (a COCO instances dict); format in the module docstring."""
    unknown = sorted(set(iou_types) - set(IOU_TYPES))
    if unknown:
        raise ValueError(f"unknown iou type(s) {unknown}; choose from {IOU_TYPES}")
    gt = ground_truth_coco(coco_gt)
    check_results(gt, results)
    if "bbox" in iou_types:
        for i, res in enumerate(results):
            if "bbox" not in res:
                raise InputError(f"results[{i}] lacks 'bbox' (needed for bbox AP)")
    metrics: dict = {"per_category": {}}
    for iou_type in iou_types:
        evaluator = run_cocoeval(gt, results_coco(gt, results, iou_type), iou_type, backend)
        metrics[iou_type] = summary_metrics(evaluator)
        metrics["per_category"][iou_type] = per_category_ap(evaluator, gt)
    metrics["num_images"] = len(gt.imgs)
    metrics["num_predictions"] = len(results)
    return metrics


def class_agnostic_segm(coco_gt: dict, results: Sequence[dict],
                        backend: str | None = None) -> dict[str, float | None]:
    """Class-agnostic mask AP of ``results`` (``SUMMARY_KEYS``): COCOeval ``segm`` with
    ``useCats = 0`` (a detection may match an instance of any category), after merging the
    results that are the same mask of the same image (a query model's post-processing emits a
    kernel's mask once per class it scores; the merged detection keeps the highest score).
    What it measures: how well the masks find and delineate the objects, categories aside."""
    gt = ground_truth_coco(coco_gt)
    check_results(gt, results)
    best: dict[tuple, dict] = {}
    for res in results:
        segmentation = res["segmentation"]
        counts = segmentation["counts"]
        key = (res["image_id"], counts if isinstance(counts, str) else bytes(counts))
        if key not in best or res["score"] > best[key]["score"]:
            best[key] = res
    merged = list(best.values())
    evaluator = run_cocoeval(gt, results_coco(gt, merged, "segm"), "segm", backend,
                             use_cats=False)
    return summary_metrics(evaluator)


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float | None]:
    """``{"segm": {"AP": x}, ...}`` -> ``{f"{prefix}segm_AP": x, ...}`` (summary values only),
    e.g. ``prefix="val/"`` for training logs."""
    return {f"{prefix}{iou_type}_{key}": metrics[iou_type][key]
            for iou_type in IOU_TYPES if iou_type in metrics for key in SUMMARY_KEYS}


def _value(x: float) -> float | None:
    return None if x < 0 else float(x)


def _quiet(fn, *args, **kwargs):
    """Call ``fn`` with its stdout (pycocotools' progress prints) discarded."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)
