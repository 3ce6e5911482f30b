"""COCO mask and box AP by pycocotools vs faster-coco-eval: the same numbers? which is faster?

    .venv/bin/python -m benchmarks.coco_eval_speed --images 200 1000 --out benchmarks/results/coco_eval_speed.txt

For each size, one synthetic evaluation set (``--seed``): square images of ``--size`` px with
3-15 ground-truth objects (random ellipses and rectangles, 80 categories) and 100 detections
per image (jittered copies of the objects with their true or a wrong category, plus random
boxes, random scores), as RLE like ``uplvp stage evaluate`` writes them. Both backends score it
through ``pipeline.evaluation.evaluate_predictions`` (segm + bbox: the report of
``evaluate``), timed end to end after one warm-up on a small set; printed: seconds per backend,
the speed-up, and the largest absolute difference over the 12 summary values and every
per-category AP (the issue's bar: 1e-6).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.evaluation import evaluate_predictions
from pipeline.evaluation.coco_eval import COCO_BACKENDS, available_backends

NUM_CATEGORIES = 80


def shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random ellipse or rectangle, 8-40 % of the side."""
    mask = np.zeros((size, size), dtype=np.uint8)
    h, w = rng.integers(int(0.08 * size), int(0.4 * size), 2)
    y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
    if rng.random() < 0.5:
        mask[y0:y0 + h, x0:x0 + w] = 1
    else:
        yy, xx = np.ogrid[:size, :size]
        cy, cx = y0 + h / 2, x0 + w / 2
        mask[((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1] = 1
    return mask


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def synthetic_set(num_images: int, size: int, seed: int) -> tuple[dict, list[dict]]:
    """(COCO ground truth, COCO results) as described in the module docstring."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": size,
                       "width": size})
        objects = []
        for _ in range(rng.integers(3, 16)):
            mask = shape_mask(rng, size)
            category = int(rng.integers(1, NUM_CATEGORIES + 1))
            rle = rle_of(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category, "segmentation": rle, "iscrowd": 0,
                                "area": float(mask.sum()),
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
            objects.append((mask, category))
        for k in range(100):
            if k < 3 * len(objects):
                mask, category = objects[k % len(objects)]
                shift = rng.integers(-size // 16, size // 16 + 1, 2)
                mask = np.roll(mask, tuple(shift), axis=(0, 1))
                if rng.random() < 0.3:
                    category = int(rng.integers(1, NUM_CATEGORIES + 1))
            else:
                mask, category = shape_mask(rng, size), int(rng.integers(1, NUM_CATEGORIES + 1))
            rle = rle_of(mask)
            results.append({"image_id": image_id, "category_id": category, "segmentation": rle,
                            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                            "score": float(rng.random())})
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, NUM_CATEGORIES + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def flat(metrics: dict) -> dict[str, float]:
    """Every number of a report: the summaries and every category's AP (None -> -1)."""
    out = {}
    for iou_type in ("segm", "bbox"):
        for key, value in metrics[iou_type].items():
            out[f"{iou_type}/{key}"] = -1.0 if value is None else value
        for row in metrics["per_category"][iou_type]:
            out[f"{iou_type}/cat{row['category_id']}"] = -1.0 if row["AP"] is None else row["AP"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    args = parser.parse_args(argv)
    backends = available_backends()
    lines = [f"# coco_eval_speed: {' vs '.join(backends)}; {platform.processor() or platform.machine()}, "
             f"python {platform.python_version()}; segm + bbox through evaluate_predictions",
             f"{'images':>6}  {'dets':>6}  " + "  ".join(f"{b + ' s':>16}" for b in backends)
             + f"  {'speed-up':>8}  {'max |diff|':>10}"]
    print("\n".join(lines), flush=True)
    warm_gt, warm_results = synthetic_set(5, 64, args.seed + 1)
    for backend in backends:
        evaluate_predictions(warm_gt, warm_results, backend=backend)
    for num_images in args.images:
        gt, results = synthetic_set(num_images, args.size, args.seed)
        seconds, reports = {}, {}
        for backend in backends:
            started = time.perf_counter()
            reports[backend] = flat(evaluate_predictions(gt, results, backend=backend))
            seconds[backend] = time.perf_counter() - started
        first = reports[backends[0]]
        diff = max((abs(first[k] - r[k]) for r in reports.values() for k in first), default=0.0)
        speedup = seconds[backends[0]] / seconds[backends[-1]]
        line = (f"{num_images:>6}  {len(results):>6}  "
                + "  ".join(f"{seconds[b]:>16.2f}" for b in backends)
                + f"  {speedup:>7.2f}x  {diff:>10.1e}")
        print(line, flush=True)
        lines.append(line)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    missing = sorted(set(COCO_BACKENDS) - set(backends))
    if missing:
        print(f"(not installed: {', '.join(missing)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
