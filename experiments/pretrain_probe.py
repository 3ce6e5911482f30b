"""What a pre-trained checkpoint can segment *without prompts*, before any fine-tuning.

Fine-tuning starts every model without prompts (nothing is injected into its kernels), so
what transfers is what the pre-trained kernels segment on their own. This script loads
pre-training checkpoints (``uplvp stage pretrain`` run folders or files), runs each model
prompt-free over a labeled manifest, and scores its masks class-agnostically with
pycocotools (every ground-truth instance becomes category 1; a prediction's score is its
objectness):

    .venv/bin/python -m experiments.pretrain_probe runs/study/pretrain/knet-* \\
        --data runs/study/data/val.yaml

Printed per run: mask AP, AP50 and AR@100 (recall averaged over IoU 0.50:0.95; with 20
kernels and 100 detections allowed, AR does not depend on the scores: it says whether *some*
kernel segments each object), the mean best IoU of each ground-truth instance over the
model's masks, and the mean objectness of the best-matching kernels vs the others. A
random-init model (the same architecture as the first checkpoint, seed 0; ``--no-scratch``
skips it) is the reference. These numbers are class-agnostic.

With ``--train MANIFEST`` (a labeled split other than ``--data``) one more column, ``catacc``,
says how much *category* information the features hold, which the pre-training never sees: the
model's ``mask_features`` (what the kernels pool) are averaged under each ground-truth mask, a
multinomial logistic regression (L2, standardised inputs) is fitted on the ``--train``
instances and its accuracy on the ``--data`` instances is printed (chance: 1 / categories).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pipeline.coco import ground_truth_rles
from pipeline.coco_dataset import eval_loader
from pipeline.errors import InputError
from pipeline.evaluation import ground_truth_coco, results_coco, run_cocoeval, summary_metrics
from pipeline.manifest import load_manifest
from pipeline.evaluation import batch_to_coco_results
from pipeline.transforms import eval_config
from pipeline.evaluation import read_model_checkpoint
from uplvp_model.model import build_model

# A pre-training checkpoint holds the PromptedModel: "model.*" plus "prompt_encoder.*" keys.
MODEL_PREFIX = "model."


def class_agnostic(coco: dict) -> dict:
    """A copy of a COCO instances dict with every annotation in one category (id 1)."""
    out = copy.deepcopy(coco)
    out["categories"] = [{"id": 1, "name": "object", "supercategory": "object"}]
    for ann in out["annotations"]:
        ann["category_id"] = 1
    return out


def load_pretrained(path: Path) -> torch.nn.Module:
    """The QEIS model of a pre-training checkpoint (prompt encoder dropped), in eval mode."""
    ckpt, payload, cfg = read_model_checkpoint(path)
    state = {k[len(MODEL_PREFIX):]: v for k, v in payload["model"].items()
             if k.startswith(MODEL_PREFIX)}
    if not state:
        raise InputError("not a pre-training checkpoint (no 'model.' keys)", ckpt)
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"weights do not fit the stored model config "
                         f"({str(err).strip().splitlines()[0]} ...)", ckpt) from None
    return model.eval()


def scratch_model(like: Path) -> torch.nn.Module:
    """A random-init model (seed 0) with the architecture of checkpoint ``like``."""
    _, _, cfg = read_model_checkpoint(like)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def best_iou_stats(results: list[dict], coco_gt: dict) -> tuple[float, float, float]:
    """(mean over GT instances of the best IoU over all predicted masks of its image,
    mean score of those best predictions, mean score of the other predictions)."""
    by_image: dict[int, list[dict]] = {}
    for res in results:
        by_image.setdefault(res["image_id"], []).append(res)
    best_ious, best_scores, other_scores = [], [], []
    for image_id, instances in ground_truth_rles(coco_gt).items():
        preds = by_image.get(image_id, [])
        if not instances:
            continue
        if not preds:
            best_ious.extend([0.0] * len(instances))
            continue
        ious = mask_utils.iou([p["segmentation"] for p in preds],
                              [rle for _, _, rle in instances], [0] * len(instances))
        ious = np.asarray(ious).reshape(len(preds), len(instances))
        best_ious.extend(ious.max(0).tolist())
        scores = np.array([p["score"] for p in preds])
        chosen = np.zeros(len(preds), dtype=bool)
        chosen[ious.argmax(0)] = True
        best_scores.extend(scores[chosen].tolist())
        other_scores.extend(scores[~chosen].tolist())
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return mean(best_ious), mean(best_scores), mean(other_scores)


def probe(model: torch.nn.Module, dataset, coco_gt: dict, short_side: int, max_long_side: int,
          batch_size: int) -> dict:
    loader = eval_loader(dataset, batch_size, resize=eval_config(short_side, max_long_side))
    results: list[dict] = []
    with torch.inference_mode():
        for batch in loader.make_batches(0):
            outputs = model(batch["images"])
            results.extend(batch_to_coco_results(outputs, batch, [1], max_detections=100))
    gt = ground_truth_coco(coco_gt)
    evaluator = run_cocoeval(gt, results_coco(gt, results, "segm"), "segm")
    summary = summary_metrics(evaluator)
    best_iou, best_score, other_score = best_iou_stats(results, coco_gt)
    return {"AP": summary["AP"], "AP50": summary["AP50"],
            "AR100": float(evaluator.stats[8]), "best_iou": best_iou,
            "score_best": best_score, "score_other": other_score}


def pooled_mask_features(model: torch.nn.Module, dataset, short_side: int, max_long_side: int,
                         batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask_features`` averaged under every ground-truth mask: ([n, D] float64, [n] labels,
    contiguous indices of the sorted category ids)."""
    category_ids = sorted(int(c["id"]) for c in dataset.categories)
    loader = eval_loader(dataset, batch_size, resize=eval_config(short_side, max_long_side),
                         category_map=category_ids)
    features, labels = [], []
    with torch.inference_mode():
        for batch in loader.make_batches(0):
            maps = model.extract_features(batch["images"])["mask_features"]
            for i, target in enumerate(batch["targets"]):
                if len(target["labels"]) == 0:
                    continue
                weights = torch.nn.functional.interpolate(
                    target["masks"][None].float(), size=maps.shape[-2:], mode="area")[0]
                weights = weights / weights.flatten(1).sum(1).clamp(min=1e-12)[:, None, None]
                features.append(torch.einsum("nhw,dhw->nd", weights, maps[i].float()))
                labels.append(target["labels"])
    return torch.cat(features).double(), torch.cat(labels)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, num_classes: int, l2: float = 1e-2) -> float:
    """Accuracy on (test_x, test_y) of an L2-regularised multinomial logistic regression fitted
    on (train_x, train_y) by L-BFGS, inputs standardised with the training mean and std."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, test = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, train_y)
        loss = loss + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(((test @ weight + bias).argmax(1) == test_y).double().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="pre-training run folders or checkpoint files")
    parser.add_argument("--data", type=Path, required=True,
                        help="a labeled manifest (e.g. the val split)")
    parser.add_argument("--short-side", type=int, default=192)
    parser.add_argument("--max-long-side", type=int, default=288)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-scratch", action="store_true", help="skip the random-init reference")
    parser.add_argument("--train", type=Path, default=None,
                        help="a labeled manifest to fit the category probe on (adds catacc)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        dataset = load_manifest(args.data)
        if not dataset.labeled:
            raise InputError("needs a labeled manifest", args.data)
        coco_gt = class_agnostic(dataset.coco)
        train_set = load_manifest(args.train) if args.train is not None else None
        if train_set is not None and not train_set.labeled:
            raise InputError("needs a labeled manifest", args.train)
        models = [] if args.no_scratch else [("scratch (random init)", scratch_model(args.runs[0]))]
        for run in args.runs:
            models.append((run.name if run.is_dir() else str(run), load_pretrained(run)))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"prompt-free, class-agnostic, {len(dataset.images)} images of {args.data} "
          f"({len(coco_gt['annotations'])} instances)")
    if train_set is not None:
        print(f"catacc: category probe fitted on {args.train}, scored on {args.data} "
              f"(chance {1 / len(dataset.categories):.3f})")
    print(f"{'run':<24} {'AP':>6} {'AP50':>6} {'AR100':>6} {'bestIoU':>8} {'obj(best)':>10} "
          f"{'obj(other)':>11}" + (f" {'catacc':>7}" if train_set is not None else "")
          + f" {'s':>5}")
    for name, model in models:
        t0 = time.perf_counter()
        m = probe(model, dataset, coco_gt, args.short_side, args.max_long_side, args.batch_size)
        extra = ""
        if train_set is not None:
            pooled = [pooled_mask_features(model, d, args.short_side, args.max_long_side,
                                           args.batch_size) for d in (train_set, dataset)]
            accuracy = linear_probe_accuracy(*pooled[0], *pooled[1], len(dataset.categories))
            extra = f" {accuracy:7.3f}"
        print(f"{name:<24} {100 * m['AP']:6.1f} {100 * m['AP50']:6.1f} {100 * m['AR100']:6.1f} "
              f"{m['best_iou']:8.3f} {m['score_best']:10.3f} {m['score_other']:11.3f}{extra} "
              f"{time.perf_counter() - t0:5.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
