"""Pseudo-mask quality of the proposers against ground truth, on labeled data.

Runs the real stage (``stages.propose.run_propose``, in this process) on the labeled splits'
manifests (the unlabeled pool has no labels to compare with), then matches every pseudo mask to
the ground-truth instances of its image by mask IoU (``pycocotools.mask.iou`` on RLEs):

    .venv/bin/python -m tools.propose_quality                   # demo data, val + train
    .venv/bin/python -m tools.propose_quality --data demo_run/data --splits val
    .venv/bin/python -m tools.propose_quality --data ../shared/data/coco_small \
        --proposers classical freemask maskcut --backbone-checkpoint runs/backbone_r18_densecl

Without ``--data`` it writes the demo's synthetic data (``uplvp demo`` defaults: seed 0, 60
train and 60 val images at base size 128) into a temporary folder; the unlabeled pool is not
written because the labeled splits' files do not depend on it (every image is seeded by
``(seed, split, index)``). With ``--data DIR`` it reads ``DIR/{split}.yaml``.

Definitions (a pseudo mask and a ground-truth instance *match* when their mask IoU >= ``--iou``):
  recall     share of ground-truth instances (``iscrowd`` 0) matched by some pseudo mask;
  precision  share of pseudo masks that match some ground-truth instance;
  all        every pseudo mask in the shards (at most ``--top-k`` per image, 20 by default);
  filtered   the masks pre-training uses: ``pipeline.shard_dataset.MaskFilter()`` (score >= 0.5,
             area >= 32 px, best 20 per image);
  AR@k       COCO's class-agnostic average recall (``COCOeval``, ``segm``, ``useCats=0``): the
             recall of the best k masks per image by score, averaged over IoU 0.50:0.05:0.95 (as
             FreeSOLO and CutLER report COCO AR); crowd regions are COCO's ignore regions.
Size buckets use COCO's absolute area thresholds (small < 32^2, medium < 96^2, large >= 96^2
pixels of the ground-truth ``area``), unscaled, so on ~128 px images "large" is rare.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.coco import ground_truth_rles
from pipeline.manifest import load_manifest
from pipeline.proposal_quality import (  # noqa: F401 (re-exported for the tests)
    AR_MAX_DETS, AREA_NAMES, SCORE_THRESHOLDS, SIZE_BUCKETS, MatchTable, coco_average_recall,
    filter_keep, label_accuracy, masks_per_image, match_masks, precision, recall,
)
from pipeline.shard_dataset import MaskFilter
from pipeline.synth import write_synth_dataset
from stages.propose import ProposeConfig, run_propose

def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    out = [line(headers), "-" * len(line(headers))]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _pct(x: float) -> str:
    return "-" if np.isnan(x) else f"{100 * x:.1f}"


@dataclass(frozen=True)
class ProposerRun:
    """One proposer set-up: ``name`` (the report's row) and the ``ProposeConfig`` fields
    beyond images/out (``proposer``, ``clip_model``, ``clip_checkpoint``, ``vocabulary``,
    ``options``)."""

    name: str
    fields: dict


def propose_split(manifest: Path, out_dir: Path, run: ProposerRun
                  ) -> tuple[pd.DataFrame, dict, float]:
    """Run the proposer through the stage on ``manifest``; returns the masks table, the COCO
    dict and the stage's seconds."""
    start = time.perf_counter()
    code = run_propose(
        ProposeConfig(images=manifest, out=out_dir, num_workers=0, overwrite=True, device="cpu",
                      **run.fields),
        progress=False,
    )
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"propose failed on {manifest} (exit code {code})")
    images = pd.read_parquet(out_dir / "images")
    if (images["status"] != "ok").any():
        bad = images.loc[images["status"] != "ok", "image_path"].tolist()
        raise SystemExit(f"propose could not read {len(bad)} image(s), e.g. {bad[0]}")
    dataset = load_manifest(manifest)
    return pd.read_parquet(out_dir / "masks"), dataset.coco, seconds


@dataclass
class SplitResult:
    """One proposer on one split: the matched table, the masks, the COCO dict, the stage's
    seconds and COCO's class-agnostic AR (:func:`coco_average_recall`)."""

    table: MatchTable
    masks: pd.DataFrame
    coco: dict
    seconds: float
    average_recall: dict[str, float]


def evaluate_split(manifest: Path, out_dir: Path, iou: float,
                   run: ProposerRun = ProposerRun("classical", {"proposer": "classical"}),
                   ) -> SplitResult:
    masks, coco, seconds = propose_split(manifest, out_dir, run)
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    table = match_masks(masks, ground_truth_rles(coco), sizes, iou)
    return SplitResult(table, masks, coco, seconds, coco_average_recall(masks, coco))


def print_average_recall(results: dict[str, SplitResult]) -> None:
    """COCO class-agnostic AR per run and split: AR@10/20/50 and per size at the largest k."""
    k = max(AR_MAX_DETS)
    headers = ["proposer split", "masks/img", "images/s", *[f"AR@{m}" for m in AR_MAX_DETS],
               f"AR_small@{k}", f"AR_medium@{k}", f"AR_large@{k}"]
    rows = []
    for name, result in results.items():
        ar = result.average_recall
        keep = np.ones(len(result.table.pred_image), bool)
        rows.append([name, f"{masks_per_image(result.table, keep):.2f}",
                     f"{result.table.num_images / result.seconds:.2f}",
                     *[_pct(ar[f"AR@{m}"]) for m in AR_MAX_DETS],
                     *[_pct(ar[f"AR_{a}@{k}"]) for a in ("small", "medium", "large")]])
    print("\nCOCO class-agnostic mask average recall, IoU 0.50:0.95 (%), best k masks per image "
          "by score; images/s: the propose stage in one process, reading included")
    print(format_table(headers, rows))


def labelled_recall(table: MatchTable, keep: np.ndarray, names: dict[int, str]) -> float:
    """Share of ground-truth instances matched by a kept pseudo mask that carries their
    category name as its label."""
    if not len(table.gt_matches):
        return float("nan")
    found = [any(keep[r] and table.pred_label[r] == names[int(c)] for r in rows)
             for rows, c in zip(table.gt_matches, table.gt_category)]
    return float(np.mean(found))


def tuning_objective(table: MatchTable, names: dict[int, str]) -> float:
    """F1 of the filtered masks' precision and labelled recall (0 when either is NaN/0)."""
    keep = filter_keep(table, MaskFilter())
    p, r = precision(table, keep), labelled_recall(table, keep, names)
    if np.isnan(p) or np.isnan(r) or p + r == 0:
        return 0.0
    return 2 * p * r / (p + r)


def print_report(results: dict[str, MatchTable], categories: list[dict], iou: float,
                 per_category: bool = True) -> None:
    keeps = {s: (np.ones(len(t.pred_image), bool), filter_keep(t, MaskFilter()))
             for s, t in results.items()}
    print(f"\nOverall (match: mask IoU >= {iou}; all = every mask in the shards, filtered = "
          "pre-training MaskFilter: score >= 0.5, area >= 32, best 20)")
    names = {int(c["id"]): c["name"] for c in categories}
    print("label acc = share of matched masks whose label is the category of the instance they "
          "overlap most (a weight-free proposer has no category names: 0)")
    rows = []
    for split, table in results.items():
        row = [split, str(table.num_images), str(len(table.gt_matches))]
        for keep in keeps[split]:
            row += [f"{masks_per_image(table, keep):.2f}", _pct(recall(table, keep)),
                    _pct(precision(table, keep)), _pct(label_accuracy(table, keep, names))]
        rows.append(row)
    print(format_table(["proposer split", "images", "GT", "masks/img", "recall %", "prec %",
                        "label acc %", "filt masks/img", "filt recall %", "filt prec %",
                        "filt label acc %"], rows))

    split_headers = [f"{s} {h}" for s in results for h in ("GT", "recall %", "filt recall %")]

    def breakdown(title: str, groups: list[tuple[str, dict[str, np.ndarray]]]) -> None:
        print(f"\n{title}")
        rows = []
        for name, selected in groups:
            row = [name]
            for split, table in results.items():
                sel = selected[split]
                row += [str(int(sel.sum())), _pct(recall(table, keeps[split][0], sel)),
                        _pct(recall(table, keeps[split][1], sel))]
            rows.append(row)
        print(format_table(["", *split_headers], rows))

    if per_category:
        breakdown("Recall per category", [
            (c["name"], {s: t.gt_category == c["id"] for s, t in results.items()})
            for c in categories
        ])
    breakdown("Recall per size (COCO area thresholds 32^2 / 96^2 px, not scaled to the images)", [
        (name, {s: (t.gt_area >= lo) & (t.gt_area < hi) for s, t in results.items()})
        for name, lo, hi in SIZE_BUCKETS
    ])

    print("\nPrecision / recall over score thresholds (score >= t, no area filter)")
    rows = []
    for t in SCORE_THRESHOLDS:
        row = [f"{t:.1f}"]
        for split, table in results.items():
            keep = table.pred_score >= t
            row += [f"{masks_per_image(table, keep):.2f}", _pct(precision(table, keep)),
                    _pct(recall(table, keep))]
        rows.append(row)
    print(format_table(
        ["score >=", *[f"{s} {h}" for s in results for h in ("masks/img", "prec %", "recall %")]],
        rows,
    ))


CLIP_GRID: dict[str, tuple] = {
    "temperature": (25.0, 50.0, 100.0),
    "threshold": (0.3, 0.5),
    "min_peak": (0.5, 0.8),
    "background_words": ("default", "none"),
    "dense_recipe": ("value", "tokens"),
}
"""``--tune``: every combination is run on the tuning split; "default" keeps the proposer's
background words, "none" drops them."""


def grid_options(base: dict) -> list[dict]:
    import itertools

    combos = []
    for values in itertools.product(*CLIP_GRID.values()):
        options = dict(base)
        for key, value in zip(CLIP_GRID, values):
            if key == "background_words":
                if value == "none":
                    options["background_words"] = []
            else:
                options[key] = value
        combos.append(options)
    return combos


def clip_fields(args, options: dict) -> dict:
    fields = {"proposer": "clip", "clip_model": args.clip_model,
              "clip_checkpoint": args.clip_checkpoint, "options": options}
    if args.vocabulary is not None:
        fields["vocabulary"] = args.vocabulary
    return fields


def tune_clip(args, data: Path, tmp: Path, names: dict[int, str]) -> dict:
    """The clip options of the grid with the best :func:`tuning_objective` on
    ``args.tune_split`` (printed as a table)."""
    base = json.loads(args.clip_options)
    manifest = data / f"{args.tune_split}.yaml"
    rows, best = [], (-1.0, base)
    for options in grid_options(base):
        run = ProposerRun("clip", clip_fields(args, options))
        result = evaluate_split(manifest, tmp / "tune", args.iou, run)
        table, seconds = result.table, result.seconds
        keep = filter_keep(table, MaskFilter())
        score = tuning_objective(table, names)
        rows.append([json.dumps({k: options.get(k, "default") for k in CLIP_GRID}),
                     f"{masks_per_image(table, keep):.2f}", _pct(recall(table, keep)),
                     _pct(precision(table, keep)), _pct(label_accuracy(table, keep, names)),
                     f"{score:.3f}", f"{seconds:.1f}"])
        if score > best[0]:
            best = (score, options)
    print(f"\nTuning the clip proposer on {args.tune_split} (filtered masks; objective: F1 of "
          "precision and labelled recall)")
    print(format_table(["options", "masks/img", "recall %", "prec %", "label acc %",
                        "objective", "s"], rows))
    print(f"best on {args.tune_split}: {json.dumps(best[1])} (objective {best[0]:.3f})")
    return best[1]


def tune_grid(args, data: Path, tmp: Path, name: str, grid: dict[str, list]) -> dict:
    """Every combination of ``grid`` (option -> values) for proposer ``name`` on
    ``args.tune_split``; returns the options with the best COCO AR@20 (printed as a table)."""
    import itertools

    base = dict(json.loads(args.proposer_options).get(name, {}))
    manifest = data / f"{args.tune_split}.yaml"
    rows, best = [], (-1.0, base)
    for values in itertools.product(*grid.values()):
        options = {**base, **dict(zip(grid, values))}
        fields = run_fields(args, name, {})
        fields["options"] = options
        result = evaluate_split(manifest, tmp / f"grid-{name}", args.iou, ProposerRun(name, fields))
        table = result.table
        everything = np.ones(len(table.pred_image), bool)
        filtered = filter_keep(table, MaskFilter())
        objective = result.average_recall["AR@20"]
        rows.append([json.dumps(dict(zip(grid, values))), f"{masks_per_image(table, everything):.2f}",
                     _pct(recall(table, everything)), _pct(precision(table, everything)),
                     _pct(recall(table, filtered)), _pct(precision(table, filtered)),
                     _pct(objective), f"{table.num_images / result.seconds:.2f}"])
        print(rows[-1], flush=True)
        if objective > best[0]:
            best = (objective, options)
    print(f"\nGrid for {name} on {args.tune_split} (objective: COCO AR@20; recall and precision at "
          f"IoU {args.iou})")
    print(format_table(["options", "masks/img", "recall %", "prec %", "filt recall %",
                        "filt prec %", "AR@20", "images/s"], rows))
    print(f"best on {args.tune_split}: {json.dumps(best[1])} (AR@20 {_pct(best[0])})")
    return best[1]


def run_fields(args, name: str, clip_options: dict) -> dict:
    """The ``ProposeConfig`` fields of proposer ``name`` from the command line."""
    options = dict(json.loads(args.proposer_options).get(name, {}))
    if name == "clip":
        fields = clip_fields(args, clip_options)
    else:
        fields = {"proposer": name, "options": options}
        if name in ("freemask", "maskcut"):
            fields["backbone_checkpoint"] = args.backbone_checkpoint
    fields["top_k"] = args.top_k
    if args.min_score is not None and name != "clip":
        fields["min_score"] = args.min_score
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="folder with {split}.yaml manifests (default: write the demo data)")
    parser.add_argument("--splits", nargs="+", default=["val", "train"])
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed (no --data)")
    parser.add_argument("--num-images", type=int, default=60,
                        help="images per labeled split when generating (no --data)")
    parser.add_argument("--image-size", type=int, default=128, help="synthetic base size")
    parser.add_argument("--iou", type=float, default=0.5, help="mask IoU of a match")
    parser.add_argument("--proposers", nargs="+", default=["classical"],
                        choices=["classical", "clip", "freemask", "maskcut"],
                        help="side by side on the same images")
    parser.add_argument("--backbone-checkpoint", default=None,
                        help="freemask / maskcut weights: a file or a `stage backbone` run folder")
    parser.add_argument("--proposer-options", default="{}",
                        help="JSON options per proposer, e.g. '{\"maskcut\": {\"tau\": 0.3}}'")
    parser.add_argument("--top-k", type=int, default=20,
                        help="at most this many masks per image (0: no cap)")
    parser.add_argument("--min-score", type=float, default=None,
                        help="drop masks scoring under this (default: each proposer's own)")
    parser.add_argument("--clip-model", default="ViT-B-16",
                        help="open_clip name or config JSON (e.g. tools/clip/*.json)")
    parser.add_argument("--clip-checkpoint", default=None, help="CLIP weights file (required)")
    parser.add_argument("--vocabulary", type=Path, default=None,
                        help="names file (default: the synthetic categories when generating)")
    parser.add_argument("--clip-options", default="{}",
                        help="JSON proposer options, e.g. '{\"input_size\": 128}'")
    parser.add_argument("--tune", action="store_true",
                        help="grid-search the clip options on --tune-split first (CLIP_GRID)")
    parser.add_argument("--tune-split", default="train")
    parser.add_argument("--grid", default=None,
                        help="JSON {proposer: {option: [values]}}: pick each proposer's options "
                             "by COCO AR@20 on --tune-split first, then run --splits with them")
    parser.add_argument("--brief", action="store_true",
                        help="leave out the per-category recall table")
    args = parser.parse_args()
    from uplvp_model.proposal.shipped import is_shipped

    if ("clip" in args.proposers and args.clip_checkpoint is None
            and not is_shipped(args.clip_model)):
        parser.error("--proposers clip needs --clip-checkpoint or a shipped --clip-model "
                     "(random weights mean nothing)")
    if {"freemask", "maskcut"} & set(args.proposers) and args.backbone_checkpoint is None:
        parser.error("--proposers freemask / maskcut need --backbone-checkpoint "
                     "(random weights mean nothing)")

    with tempfile.TemporaryDirectory(prefix="uplvp-propose-quality-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            start = time.perf_counter()
            write_synth_dataset(data, seed=args.seed, num_unlabeled=0, num_train=args.num_images,
                                num_val=args.num_images, image_size=args.image_size,
                                progress=False)
            print(f"synthetic data: seed {args.seed}, {args.num_images} train + "
                  f"{args.num_images} val images at base size {args.image_size} "
                  f"({time.perf_counter() - start:.1f} s)")
        categories = load_manifest(data / f"{args.splits[0]}.yaml").coco["categories"]
        names = {int(c["id"]): c["name"] for c in categories}
        if "clip" in args.proposers and args.vocabulary is None:
            args.vocabulary = Path(tmp) / "vocabulary.txt"
            args.vocabulary.write_text("".join(f"{c['name']}\n" for c in categories))
        clip_options = json.loads(args.clip_options)
        if "clip" in args.proposers and args.tune:
            clip_options = tune_clip(args, data, Path(tmp), names)
        if args.grid:
            chosen = json.loads(args.proposer_options)
            for name, grid in json.loads(args.grid).items():
                chosen[name] = tune_grid(args, data, Path(tmp), name, grid)
            args.proposer_options = json.dumps(chosen)
        runs = [ProposerRun(name, run_fields(args, name, clip_options)) for name in args.proposers]
        results: dict[str, SplitResult] = {}
        for run in runs:
            print(f"{run.name}: {json.dumps(run.fields, default=str)}")
            for split in args.splits:
                manifest = data / f"{split}.yaml"
                result = evaluate_split(
                    manifest, Path(tmp) / f"propose-{run.name}-{split}", args.iou, run)
                results[f"{run.name} {split}"] = result
                print(f"propose ({run.name}, stage, 1 process) on {split}: "
                      f"{result.table.num_images} images in {result.seconds:.1f} s "
                      f"({result.table.num_images / result.seconds:.2f} images/s)")
        if "clip" in args.proposers:
            print(f"clip: {args.clip_model} + {args.clip_checkpoint}, options "
                  f"{json.dumps(clip_options)}")
        print_report({k: r.table for k, r in results.items()}, categories, args.iou,
                     per_category=not args.brief)
        print_average_recall(results)


if __name__ == "__main__":
    main()
