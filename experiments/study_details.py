"""The low-data study's numbers behind its hand-written reading, printed from a study folder.

    .venv/bin/python -m experiments.study_details --out runs/study

Reads ``results.jsonl`` and the runs' ``metrics.jsonl`` of a ``experiments/low_data_study.py``
folder (or a copy of its kept export, ``experiments/results/study``, which has no pre-training
runs) and prints, per (decoder, regime, arm):

1. the final mask AP of each seed, and the per-seed difference to the reference arms (mean ±
   std, how many seeds are below): ``full`` for every arm, ``full`` and ``clip`` for
   ``clip_text``; a peer decoder's (Mask R-CNN's) cells against our decoders' ``scratch``,
   ``full`` and ``clip_text`` cells of the same regime;
2. the validation mask AP curve, mean over seeds, at every evaluated step;
3. the fine-tuning training losses (dice, CE, mask BCE), mean over seeds, at steps 50, 200 and
   the last logged step;
4. per pre-training run (``pretrain/*/metrics.jsonl``, when present): the mean of the last four
   logged training steps of the total, dice, focal and BCE losses.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from pipeline.errors import InputError
from pipeline.splits import format_percent
from pipeline.engine.metrics import read_metrics
from pipeline.engine.metrics import METRICS_FILE

from experiments.low_data_study import ARMS, DECODERS, PEER_DECODERS, read_results

LOSS_STEPS = (50, 200)
LOSS_KEYS = ("loss_dice", "loss_ce", "loss_bce")
PRETRAIN_KEYS = ("loss", "loss_dice", "loss_focal", "loss_bce")
LAST_LOGGED = 4


def groups(records: list[dict]) -> dict[tuple, dict[int, dict]]:
    """(decoder, regime, arm) -> seed -> record, in study order (decoder, regime, ARMS order)."""
    out: dict[tuple, dict[int, dict]] = {}
    for r in sorted(records, key=lambda r: (r["decoder"], float(r["regime"]),
                                            list(ARMS).index(r["arm"]), int(r["seed"]))):
        out.setdefault((r["decoder"], float(r["regime"]), r["arm"]), {})[int(r["seed"])] = r
    return out


def label(key: tuple) -> str:
    decoder, regime, arm = key
    return f"{decoder} {format_percent(regime)}% {arm}"


def mean_std(values: list[float]) -> str:
    """``+m ± s`` at one decimal (a mean that rounds to zero prints ``+0.0``, never ``-0.0``)."""
    if not values:
        return "-"
    mean = round(statistics.mean(values), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    if len(values) < 2:
        return f"{mean:+.1f}"
    return f"{mean:+.1f} ± {statistics.stdev(values):.1f}"


# the arms each arm is compared with, seed by seed, within its decoder (default: ``full``)
REFERENCES: dict[str, tuple[str, ...]] = {"full": (), "clip_text": ("full", "clip")}
# arms of our decoders a peer decoder's (Mask R-CNN's) cells are compared with
PEER_REFERENCES = ("scratch", "full", "clip_text")


def difference(by_seed: dict[int, dict], reference: dict[int, dict], name: str) -> str:
    """``   vs NAME: d0 d1 d2 = mean ± std (k/n below)`` over the seeds both have (AP points,
    this row minus the reference), or "" when they share no seed."""
    diffs = [100 * (r["AP"] - reference[s]["AP"]) for s, r in by_seed.items() if s in reference]
    if not diffs:
        return ""
    below = sum(d < 0 for d in diffs)
    return (f"   vs {name}: {' '.join(f'{d:+.1f}' for d in diffs)} = {mean_std(diffs)}"
            f" ({below}/{len(diffs)} below)")


def per_seed_lines(grouped: dict[tuple, dict[int, dict]]) -> list[str]:
    lines = ["final mask AP per seed; difference to the reference arms of the same seed "
             "(`full`; `clip_text`: `full` and `clip`; Mask R-CNN: our decoders' "
             f"{', '.join(PEER_REFERENCES)})"]
    for key, by_seed in grouped.items():
        decoder, regime, arm = key
        aps = "  ".join(f"s{s} {100 * r['AP']:4.1f}" for s, r in by_seed.items())
        text = f"  {label(key):<28} {aps}"
        if decoder in PEER_DECODERS:
            references = [((other, regime, ref), f"{other} {ref}") for other in DECODERS
                          if other not in PEER_DECODERS for ref in PEER_REFERENCES]
        else:
            references = [((decoder, regime, ref), ref) for ref in REFERENCES.get(arm, ("full",))]
        for ref_key, name in references:
            text += difference(by_seed, grouped.get(ref_key, {}), name)
        lines.append(text)
    return lines


def mean_at(records: list[list[dict]], step: int, key: str) -> float | None:
    values = [r[key] for run in records for r in run if r.get("kind") == "train"
              and r["step"] == step and r.get(key) is not None]
    return statistics.mean(values) if len(values) == len(records) else None


def curve_and_loss_lines(out: Path, grouped: dict[tuple, dict[int, dict]]) -> list[str]:
    curves = ["validation mask AP, mean over seeds, at each evaluated step"]
    losses = [f"fine-tuning training losses ({', '.join(LOSS_KEYS)}), mean over seeds"]
    for key, by_seed in grouped.items():
        runs = [read_metrics(out / r["run"] / METRICS_FILE) for r in by_seed.values()]
        evals = [{r["step"]: r.get("val/segm_AP") for r in run if r.get("kind") == "eval"}
                 for run in runs]
        steps = sorted(set.intersection(*(set(e) for e in evals)))
        points = "  ".join(f"{s}:{100 * statistics.mean(e[s] for e in evals):.1f}" for s in steps
                           if all(e[s] is not None for e in evals))
        curves.append(f"  {label(key):<28} {points}")
        last = min(max(r["step"] for r in run if r.get("kind") == "train") for run in runs)
        parts, logged = [], False
        for step in (*LOSS_STEPS, last):
            values = [mean_at(runs, step, k) for k in LOSS_KEYS]
            logged = logged or any(v is not None for v in values)
            shown = " / ".join("-" if v is None else f"{v:.2f}" for v in values)
            parts.append(f"step {step}: {shown}")
        if logged:  # Mask R-CNN logs other losses
            losses.append(f"  {label(key):<28} " + "   ".join(parts))
    return curves + [""] + losses


def pretrain_lines(out: Path) -> list[str]:
    runs = sorted((out / "pretrain").glob(f"*/{METRICS_FILE}"))
    if not runs:
        return [f"pre-training: no {out / 'pretrain'}/*/{METRICS_FILE} (not in a kept export)"]
    lines = [f"pre-training losses, mean of the last {LAST_LOGGED} logged training steps "
             f"({', '.join(PRETRAIN_KEYS)})"]
    for path in runs:
        train = [r for r in read_metrics(path) if r.get("kind") == "train"][-LAST_LOGGED:]
        values = "  ".join(f"{k} {statistics.mean(r[k] for r in train):.2f}" for k in PRETRAIN_KEYS)
        lines.append(f"  {path.parent.name:<24} steps {train[0]['step']}-{train[-1]['step']}: "
                     f"{values}")
    return lines


def details(out: Path) -> str:
    records = read_results(out)
    if not records:
        raise InputError("no results.jsonl with cells (is this a study folder?)", out)
    grouped = groups(records)
    return "\n".join([*per_seed_lines(grouped), "", *curve_and_loss_lines(out, grouped), "",
                      *pretrain_lines(out)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the study folder")
    args = parser.parse_args(argv)
    try:
        print(details(args.out))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
