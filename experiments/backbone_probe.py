"""Did the backbone learn something? k-NN and linear probes on the instance crops of a labeled
COCO-format set: train-split crops -> val-split category accuracy, per backbone checkpoint.

    .venv/bin/python -m experiments.backbone_probe --data ../shared/data/coco_small \\
        --preset small --checkpoints random runs/backbone_r18_mocov2 runs/backbone_r18_densecl

Each non-crowd instance whose box is at least ``--min-side`` px on both sides is cropped (its box
grown by ``--context`` on every side, clipped to the image), resized to ``--crop-size`` square
(aspect ratio not kept) and encoded by the backbone in eval mode: c5 averaged over locations,
L2-normalised (``uplvp_model.self_supervised.global_embedding``). Probes, both fitted on the
train crops only and scored on the val crops:

- **k-NN**: the ``--k`` most cosine-similar train crops vote with weight ``exp(cos / 0.07)``
  (the weighted k-NN of InstDisc / DINO); no setting is fitted.
- **linear**: multinomial logistic regression on the standardised features (full-batch L-BFGS);
  its L2 weight is chosen among ``LINEAR_WEIGHT_DECAYS`` on a held-out fifth of the *train*
  crops, then refitted on all train crops.

Also printed: the majority class's share of the val crops (what guessing the most frequent
train category scores) and, per probe, the mean per-category accuracy (categories with a val
crop). ``random``: the preset's backbone with seeded random weights (what the stage starts
from); a checkpoint is read as the architecture it names (``backbone.pt`` carries it).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.images import read_image_rgb
from pipeline.manifest import load_manifest
from pipeline.transforms import normalize_image
from uplvp_model.backbone import build_backbone
from uplvp_model.checkpoint import load_backbone_checkpoint, resolve_backbone_path
from uplvp_model.config import model_config
from uplvp_model.proposal.features import checkpoint_architecture
from uplvp_model.self_supervised import global_embedding

LINEAR_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)
KNN_TEMPERATURE = 0.07


@dataclass
class Crops:
    """Instance crops of one split: images float32 [N, 3, S, S] (normalised), labels int64 [N]
    (COCO category ids)."""

    images: np.ndarray
    labels: np.ndarray


def instance_crops(manifest: Path, crop_size: int, min_side: float, context: float) -> Crops:
    """The crops of every non-crowd instance of ``manifest`` with a box of at least
    ``min_side`` px per side (see module docstring)."""
    dataset = load_manifest(manifest)
    by_image: dict[int, list[dict]] = {}
    for ann in dataset.coco["annotations"]:
        if not ann.get("iscrowd", 0) and min(ann["bbox"][2:]) >= min_side:
            by_image.setdefault(ann["image_id"], []).append(ann)
    images, labels = [], []
    for record in dataset.images:
        anns = by_image.get(record.image_id, [])
        if not anns:
            continue
        image = read_image_rgb(record.path)
        height, width = image.shape[:2]
        for ann in anns:
            x, y, w, h = ann["bbox"]
            x0, y0 = max(0, int(x - context * w)), max(0, int(y - context * h))
            x1 = min(width, int(np.ceil(x + w + context * w)))
            y1 = min(height, int(np.ceil(y + h + context * h)))
            crop = cv2.resize(image[y0:y1, x0:x1], (crop_size, crop_size),
                              interpolation=cv2.INTER_AREA)
            images.append(normalize_image(crop))
            labels.append(int(ann["category_id"]))
    return Crops(np.stack(images), np.asarray(labels, dtype=np.int64))


@torch.inference_mode()
def embed(backbone: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """[N, C] L2-normalised global features of the crops."""
    backbone.eval()
    return torch.cat([global_embedding(backbone, torch.from_numpy(images[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)])


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor,
                k: int, temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Weighted k-NN: each query's label is the class with the largest sum of
    ``exp(cos / temperature)`` over its ``k`` most similar train rows (features L2-normalised;
    ties: the smaller class id)."""
    similarity = query @ train.T  # [Q, N]
    k = min(k, train.shape[0])
    top, index = similarity.topk(k, dim=1)
    classes, inverse = torch.unique(train_labels, return_inverse=True)
    votes = torch.zeros(query.shape[0], len(classes), dtype=torch.float64)
    votes.scatter_add_(1, inverse[index], torch.exp(top.double() / temperature))
    return classes[votes.argmax(dim=1)]


def fit_linear(features: torch.Tensor, labels: torch.Tensor, weight_decay: float,
               iterations: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression (full-batch L-BFGS, L2 ``weight_decay`` on the weights)
    over the classes in ``labels``; returns the layer (classes indexed as ``torch.unique``)."""
    classes, target = torch.unique(labels, return_inverse=True)
    torch.manual_seed(0)
    layer = torch.nn.Linear(features.shape[1], len(classes)).double()
    x = features.double()
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=iterations,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(x), target) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    layer.classes = classes  # type: ignore[attr-defined]
    return layer


def linear_predict(layer: torch.nn.Linear, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer.classes[layer(features.double()).argmax(dim=1)]  # type: ignore[attr-defined]


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor,
                 seed: int = 0) -> tuple[torch.Tensor, float]:
    """Val predictions of the linear probe and the weight decay chosen on a held-out fifth of
    the train features."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(train)))
    held, fit = order[: len(order) // 5], order[len(order) // 5:]
    best = (-1.0, LINEAR_WEIGHT_DECAYS[0])
    for decay in LINEAR_WEIGHT_DECAYS:
        x_fit, x_held = standardise(train[fit], train[held])
        layer = fit_linear(x_fit, train_labels[fit], decay)
        accuracy = float((linear_predict(layer, x_held) == train_labels[held]).double().mean())
        best = max(best, (accuracy, decay))
    x_train, x_val = standardise(train, val)
    layer = fit_linear(x_train, train_labels, best[1])
    return linear_predict(layer, x_val), best[1]


def accuracies(predicted: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(top-1 accuracy, mean per-category accuracy over the categories present in ``truth``)."""
    correct = (predicted == truth).double()
    per_class = [float(correct[truth == c].mean()) for c in torch.unique(truth)]
    return float(correct.mean()), float(np.mean(per_class))


def load_probe_backbone(preset: str, checkpoint: str) -> torch.nn.Module:
    """``random``: the preset's backbone with seeded random weights; else the architecture the
    checkpoint names (the preset's for files that name none) with its weights (strictly: every
    tensor must fit)."""
    cfg = model_config(preset)
    name, channels = cfg.backbone, cfg.tiny_channels
    if checkpoint != "random":
        named, named_channels = checkpoint_architecture(checkpoint)
        name, channels = named or name, named_channels or channels
    torch.manual_seed(0)
    backbone = build_backbone(name, channels)
    if checkpoint != "random":
        load_backbone_checkpoint(backbone.body, checkpoint)
    return backbone.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with train.yaml and val.yaml (labeled manifests)")
    parser.add_argument("--preset", default="small",
                        help="tiny | small | base: the architecture of 'random' and of files "
                             "that name none")
    parser.add_argument("--checkpoints", nargs="+", default=["random"],
                        help="backbone checkpoints or `stage backbone` run folders; 'random'")
    parser.add_argument("--crop-size", type=int, default=112)
    parser.add_argument("--min-side", type=float, default=16.0)
    parser.add_argument("--context", type=float, default=0.1)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()

    start = time.perf_counter()
    train = instance_crops(args.data / "train.yaml", args.crop_size, args.min_side, args.context)
    val = instance_crops(args.data / "val.yaml", args.crop_size, args.min_side, args.context)
    train_labels, val_labels = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
    values, counts = np.unique(train.labels, return_counts=True)
    majority = float((val.labels == values[counts.argmax()]).mean())
    print(f"crops: {len(train.labels)} train, {len(val.labels)} val ({len(values)} train "
          f"categories; box >= {args.min_side:g} px, context {args.context:g}, "
          f"{args.crop_size} px) in {time.perf_counter() - start:.1f} s; majority-class "
          f"accuracy on val {100 * majority:.1f} %")
    rows = []
    for checkpoint in args.checkpoints:
        start = time.perf_counter()
        name = checkpoint if checkpoint == "random" else str(resolve_backbone_path(checkpoint))
        backbone = load_probe_backbone(args.preset, checkpoint)
        f_train, f_val = embed(backbone, train.images), embed(backbone, val.images)
        knn = accuracies(knn_predict(f_train, train_labels, f_val, args.k), val_labels)
        predicted, decay = linear_probe(f_train, train_labels, f_val)
        linear = accuracies(predicted, val_labels)
        rows.append((name, knn, linear, decay, time.perf_counter() - start))
        print(f"{name}: k-NN {100 * knn[0]:.1f} %, linear {100 * linear[0]:.1f} % "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\nProbes on {args.data} instance crops, {args.preset} backbone (train -> val "
          f"category accuracy, %; k-NN k={args.k}; mean/cat: mean per-category accuracy)")
    width = max(len(r[0]) for r in rows)
    print(f"{'backbone'.ljust(width)}  k-NN top-1  k-NN mean/cat  linear top-1  linear mean/cat  "
          "linear wd")
    for name, knn, linear, decay, _ in rows:
        print(f"{name.ljust(width)}  {100 * knn[0]:10.1f}  {100 * knn[1]:13.1f}  "
              f"{100 * linear[0]:12.1f}  {100 * linear[1]:15.1f}  {decay:9.0e}")
    print(f"{'majority class'.ljust(width)}  {100 * majority:10.1f}")


if __name__ == "__main__":
    main()
