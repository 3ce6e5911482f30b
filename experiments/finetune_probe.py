"""Where a fine-tuned model's mask AP comes from: finding and segmenting objects, or naming them.

    .venv/bin/python -m experiments.finetune_probe demo_run/finetune_pretrained \\
        demo_run/finetune_scratch --data demo_run/data/val.yaml --short-side 128

Loads fine-tuned checkpoints (``uplvp stage finetune`` run folders or files), predicts on a
labeled manifest and prints per run:

- ``AP`` / ``AP50``: the usual class-aware mask AP (as ``uplvp stage evaluate``);
- ``agnAP`` / ``agnAP50``: class-agnostic mask AP, every ground-truth instance in one category
  and each kernel scored by its objectness (1 - p(no object)) times its mask score: how well
  the model finds and segments objects, whatever it calls them;
- ``found``: share of ground-truth instances covered by some kernel's mask at IoU >= 0.5, and
  ``bestIoU``: mean over instances of the best IoU;
- ``label``: of the found instances, the share whose highest-scored class-aware detection at
  IoU >= 0.5 has the right category; ``conf``: that detection's mean score;
- ``>0.5/img``: detections per image scoring above 0.5 (``uplvp predict``'s default threshold
  for overlays).

A model with a high agnAP and a low AP segments objects but mislabels them. Scores come from
``pipeline.evaluation.postprocess`` (class probability x mask score), as evaluation computes them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from experiments.pretrain_probe import best_iou_stats, class_agnostic

from pipeline.coco import ground_truth_rles
from pipeline.coco_dataset import eval_loader
from pipeline.errors import InputError
from pipeline.evaluation import evaluate_predictions
from pipeline.manifest import load_manifest
from pipeline.evaluation import batch_to_coco_results
from pipeline.transforms import eval_config
from pipeline.evaluation import load_inference_model

IOU_FOUND = 0.5
OVERLAY_THRESHOLD = 0.5


def objectness_outputs(outputs: dict) -> dict:
    """The outputs with ``pred_logits`` [B, N, C+1] turned into one class vs no object: the
    softmax of ``[logsumexp(class logits), no-object logit]`` gives p(any class)."""
    logits = outputs["pred_logits"].float()
    two = torch.stack([torch.logsumexp(logits[..., :-1], -1), logits[..., -1]], -1)
    return {**outputs, "pred_logits": two}


def label_stats(results: list[dict], coco_gt: dict) -> tuple[float, float, int]:
    """(share of ground-truth instances covered at IoU >= 0.5 by some class-aware detection
    whose best-scored such detection has the right category, its mean score, instances
    covered). Crowd annotations are ignored."""
    by_image: dict[int, list[dict]] = {}
    for res in results:
        by_image.setdefault(res["image_id"], []).append(res)
    correct, scores, covered = 0, [], 0
    for image_id, instances in ground_truth_rles(coco_gt).items():
        preds = by_image.get(image_id, [])
        if not instances or not preds:
            continue
        ious = np.asarray(mask_utils.iou([p["segmentation"] for p in preds],
                                         [rle for _, _, rle in instances], [0] * len(instances)))
        ious = ious.reshape(len(preds), len(instances))
        pred_scores = np.array([p["score"] for p in preds])
        for j, (category, _, _) in enumerate(instances):
            hits = np.flatnonzero(ious[:, j] >= IOU_FOUND)
            if hits.size == 0:
                continue
            best = hits[np.argmax(pred_scores[hits])]
            covered += 1
            correct += int(preds[best]["category_id"] == category)
            scores.append(pred_scores[best])
    share = correct / covered if covered else float("nan")
    return share, float(np.mean(scores)) if scores else float("nan"), covered


def probe_finetuned(run: Path, dataset, short_side: int, max_long_side: int,
                    batch_size: int) -> dict:
    """Every number of the module docstring for one fine-tuned checkpoint."""
    loaded = load_inference_model(run, "cpu")
    categories = loaded.category_ids
    loader = eval_loader(dataset, batch_size, resize=eval_config(short_side, max_long_side),
                         category_map=categories)
    aware: list[dict] = []
    agnostic: list[dict] = []
    with torch.inference_mode():
        for batch in loader.make_batches(0):
            outputs = loaded.model(batch["images"])
            aware.extend(batch_to_coco_results(outputs, batch, categories))
            agnostic.extend(batch_to_coco_results(objectness_outputs(outputs), batch, [1]))
    agnostic_gt = class_agnostic(dataset.coco)
    segm = evaluate_predictions(dataset.coco, aware)["segm"]
    agn = evaluate_predictions(agnostic_gt, agnostic)["segm"]
    best_iou, _, _ = best_iou_stats(agnostic, agnostic_gt)
    found = sum(1 for _, instances in _found(agnostic, agnostic_gt) for hit in instances if hit)
    total = sum(len(v) for v in ground_truth_rles(dataset.coco).values())
    label, conf, _ = label_stats(aware, dataset.coco)
    confident = sum(1 for r in aware if r["score"] > OVERLAY_THRESHOLD)
    return {"AP": segm["AP"], "AP50": segm["AP50"], "agnAP": agn["AP"], "agnAP50": agn["AP50"],
            "found": found / total if total else float("nan"), "best_iou": best_iou,
            "label": label, "conf": conf, "confident_per_image": confident / len(dataset.images)}


def _found(results: list[dict], coco_gt: dict):
    """Per image: for each ground-truth instance, whether some result covers it at IoU >= 0.5."""
    by_image: dict[int, list[dict]] = {}
    for res in results:
        by_image.setdefault(res["image_id"], []).append(res)
    for image_id, instances in ground_truth_rles(coco_gt).items():
        preds = by_image.get(image_id, [])
        if not instances or not preds:
            yield image_id, [False] * len(instances)
            continue
        ious = np.asarray(mask_utils.iou([p["segmentation"] for p in preds],
                                         [rle for _, _, rle in instances], [0] * len(instances)))
        yield image_id, list(ious.reshape(len(preds), len(instances)).max(0) >= IOU_FOUND)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="fine-tuning run folders or checkpoints")
    parser.add_argument("--data", type=Path, required=True, help="a labeled manifest (val split)")
    parser.add_argument("--short-side", type=int, default=128)
    parser.add_argument("--max-long-side", type=int, default=None,
                        help="default: 1.5x the short side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    max_long = args.max_long_side or round(1.5 * args.short_side)
    try:
        dataset = load_manifest(args.data)
        if not dataset.labeled:
            raise InputError("needs a labeled manifest", args.data)
        print(f"{len(dataset.images)} images of {args.data} ({len(dataset.coco['annotations'])} "
              f"instances), short side {args.short_side}")
        print(f"{'run':<34} {'AP':>5} {'AP50':>5} {'agnAP':>6} {'agnAP50':>7} {'found':>6} "
              f"{'bestIoU':>7} {'label':>6} {'conf':>5} {'>0.5/img':>8} {'s':>4}")
        for run in args.runs:
            t0 = time.perf_counter()
            m = probe_finetuned(run, dataset, args.short_side, max_long, args.batch_size)
            name = str(run)[-34:]
            print(f"{name:<34} {100 * m['AP']:5.1f} {100 * m['AP50']:5.1f} "
                  f"{100 * m['agnAP']:6.1f} {100 * m['agnAP50']:7.1f} {m['found']:6.3f} "
                  f"{m['best_iou']:7.3f} {m['label']:6.3f} {m['conf']:5.3f} "
                  f"{m['confident_per_image']:8.2f} {time.perf_counter() - t0:4.1f}", flush=True)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
