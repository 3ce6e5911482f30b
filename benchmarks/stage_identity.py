"""Do a trained model's kernels keep their object from stage to stage, and do they classify it?

    .venv/bin/python benchmarks/stage_identity.py --val runs/peers/data/128px/val.yaml \
        --size 128 runs/peers/cells/128px-250steps-knet runs/peers/cells/128px-250steps-mask2former

For every fine-tuned checkpoint (a ``uplvp stage finetune`` output folder, e.g. a cell of
``benchmarks/peers.py``) it runs the model on the val manifest and matches the final stage's
kernels to the ground truth with the fine-tuning matcher (``SetCriterion``'s Hungarian matcher,
uniform points, seed 0). For those matched kernels it prints:

- per decoder stage (0 = the input kernels, last = the final output): the median and mean IoU of
  the kernel's hard mask (logit > 0) at that stage with the object it is matched to at the end,
  and the median ratio of the mask's area to the object's. A decoder whose kernels keep their
  object has IoU > 0 at every stage; one whose stages hand objects between kernels has ~0 before
  the last stage (each stage's own matching picks other kernels).
- ``p(class)`` / ``p(no object)``: the mean softmax probability the final stage gives the
  object's class and "no object"; ``rank``: the median rank of the matched kernels among all
  kernels of their image by the best class probability (0 = top; scores decide AP).

It also matches every stage on its own predictions (the same matcher) and prints per stage the
share of objects held by the same kernel as at the end (``same kernel``), and that stage's own
matched kernels' median IoU and mean class probability (``own IoU``, ``own p(class)``): what each
stage could reach with a free choice of kernel.

Numbers are of one model on one val set; they explain an AP, they are not one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def hard_mask_iou(mask_logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and area ratio of hard masks ``mask_logits > 0`` [M, h, w] with ``targets`` [M, H, W]
    (bool, resampled bilinearly to h x w and thresholded at 0.5), pair by pair: two [M]."""
    pred = (mask_logits > 0).float()
    target = F.interpolate(targets[None].float(), size=tuple(pred.shape[-2:]), mode="bilinear",
                           align_corners=False)[0].gt(0.5).float()
    inter = (pred * target).sum((1, 2))
    union = ((pred + target) > 0).float().sum((1, 2))
    return inter / union.clamp(min=1), pred.sum((1, 2)) / target.sum((1, 2)).clamp(min=1)


def stage_identity(outputs: dict, targets: list[dict], indices: list[tuple[Tensor, Tensor]]
                   ) -> dict:
    """Per-stage IoU / area ratio of the kernels matched at the final stage (``indices``: per
    image (kernel, target) index pairs) with their final object, plus class-score facts.

    Returns ``{"iou": [stage -> list], "area": [stage -> list], "p_class": list,
    "p_none": list, "rank": list}``; stages are ``aux_outputs`` then the final output."""
    layers = list(outputs.get("aux_outputs", [])) + [outputs]
    result: dict = {"iou": [[] for _ in layers], "area": [[] for _ in layers],
                    "p_class": [], "p_none": [], "rank": []}
    prob = outputs["pred_logits"].float().softmax(-1)
    for i, (src, tgt) in enumerate(indices):
        if len(src) == 0:
            continue
        masks = targets[i]["masks"][tgt]
        for s, layer in enumerate(layers):
            iou, area = hard_mask_iou(layer["pred_masks"][i, src].float(), masks)
            result["iou"][s] += iou.tolist()
            result["area"][s] += area.tolist()
        labels = targets[i]["labels"][tgt]
        result["p_class"] += prob[i, src, labels].tolist()
        result["p_none"] += prob[i, src, -1].tolist()
        score = prob[i, :, :-1].max(-1).values
        order = score.argsort(descending=True, stable=True)
        rank_of = torch.empty_like(order)
        rank_of[order] = torch.arange(len(order), device=order.device)
        result["rank"] += rank_of[src.to(order.device)].tolist()
    return result


def own_matching(outputs: dict, targets: list[dict], stage_indices: list[list[tuple[Tensor, Tensor]]],
                 final: list[tuple[Tensor, Tensor]]) -> dict:
    """Per stage, with ``stage_indices[s]`` that stage's own matching (``aux_outputs`` then the
    final output) and ``final`` the final stage's: ``{"same": [stage -> list of 0/1 per object
    matched at the end: held by the same kernel at that stage], "own_iou": [stage -> IoU of each
    own-matched kernel's hard mask with its object], "own_p_class": [stage -> its softmax
    probability of the object's class]}``."""
    layers = list(outputs.get("aux_outputs", [])) + [outputs]
    result: dict = {"same": [[] for _ in layers], "own_iou": [[] for _ in layers],
                    "own_p_class": [[] for _ in layers]}
    for s, (layer, indices) in enumerate(zip(layers, stage_indices)):
        prob = layer["pred_logits"].float().softmax(-1)
        for i, (src, tgt) in enumerate(indices):
            kernel_of = {int(t): int(k) for k, t in zip(src, tgt)}
            result["same"][s] += [float(kernel_of.get(int(t)) == int(k)) for k, t in zip(*final[i])]
            if len(src):
                iou, _ = hard_mask_iou(layer["pred_masks"][i, src].float(), targets[i]["masks"][tgt])
                result["own_iou"][s] += iou.tolist()
                result["own_p_class"][s] += prob[i, src, targets[i]["labels"][tgt]].tolist()
    return result


def report(name: str, facts: dict) -> str:
    """The printed block of one model."""
    own = "same" in facts
    head = "| stage | IoU median | IoU mean | area ratio median |"
    lines = [f"## {name}", head + (" same kernel | own IoU median | own p(class) |" if own else ""),
             "|---|---|---|---|" + ("---|---|---|" if own else "")]
    for s, (iou, area) in enumerate(zip(facts["iou"], facts["area"])):
        if iou:
            row = (f"| {s} | {statistics.median(iou):.3f} | {sum(iou) / len(iou):.3f} | "
                   f"{statistics.median(area):.2f} |")
            if own:
                same, own_iou, own_p = facts["same"][s], facts["own_iou"][s], facts["own_p_class"][s]
                row += (f" {sum(same) / len(same):.2f} | {statistics.median(own_iou):.3f} | "
                        f"{sum(own_p) / len(own_p):.3f} |")
            lines.append(row)
    n = len(facts["p_class"])
    if n:
        lines.append(f"matched kernels: {n}; p(class) {sum(facts['p_class']) / n:.3f}, p(no object) "
                     f"{sum(facts['p_none']) / n:.3f}, rank median {statistics.median(facts['rank'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="fine-tuning output folders")
    p.add_argument("--val", type=Path, required=True, help="labeled manifest to run on")
    p.add_argument("--size", type=int, default=128, help="eval size, as peers.py scores a cell of --sizes S")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from pipeline.coco_dataset import eval_loader
    from pipeline.errors import InputError
    from pipeline.manifest import load_manifest
    from pipeline.transforms import eval_config
    from pipeline.evaluation import load_inference_model
    from uplvp_model.criterion import SetCriterion

    torch.set_num_threads(args.threads)
    try:
        dataset = load_manifest(args.val)
    except InputError as err:
        print(f"stage_identity: {err}", file=sys.stderr)
        return 2
    for run in args.runs:
        try:
            loaded = load_inference_model(run, "cpu")
        except InputError as err:
            print(f"stage_identity: {err}", file=sys.stderr)
            return 2
        matcher = SetCriterion().matcher
        generator = torch.Generator().manual_seed(0)
        facts: dict = {}
        loader = eval_loader(dataset, args.batch_size, resize=eval_config(args.size, args.size),
                             category_map=loaded.category_ids)
        with torch.no_grad():
            for batch in loader.make_batches(0):
                outputs = loaded.model(batch["images"])
                indices = matcher(outputs["pred_logits"], outputs["pred_masks"],
                                  batch["targets"], generator=generator)
                layers = list(outputs.get("aux_outputs", [])) + [outputs]
                stage_indices = [matcher(layer["pred_logits"], layer["pred_masks"], batch["targets"],
                                         generator=generator) for layer in layers[:-1]] + [indices]
                found = {**stage_identity(outputs, batch["targets"], indices),
                         **own_matching(outputs, batch["targets"], stage_indices, indices)}
                for key, values in found.items():
                    if key in ("iou", "area", "same", "own_iou", "own_p_class"):
                        facts.setdefault(key, [[] for _ in values])
                        for s, v in enumerate(values):
                            facts[key][s] += v
                    else:
                        facts.setdefault(key, []).extend(values)
        print(report(f"{run} (step {loaded.step}, {loaded.model.cfg.decoder})", facts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
