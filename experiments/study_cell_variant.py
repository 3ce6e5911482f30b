"""Rerun kept low-data study cells with fine-tuning options changed, paired by seed.

    .venv/bin/python -m experiments.study_cell_variant --study runs/study_knetprev \\
        --out runs/ablate_w55 --tag w55 --set bce_weight=5.0 --set dice_weight=5.0 \\
        --cells knet-1pct-seed0-full knet-1pct-seed1-full knet-1pct-seed2-full

A cell's resolved fine-tuning config (``STUDY/finetune/CELL/stage.json``) is reused as it ran
(same subset, pre-trained init, budget, seed), with the ``--set`` options (FinetuneConfig
fields, or a dotted path into a section such as ``train.max_steps`` or
``model.freeze_backbone``; values read as YAML) and a new run folder ``OUT/CELL-TAG``, written to
``OUT/CELL-TAG.yaml`` and run by ``uplvp stage finetune --config`` in its own process (one
thread unless ``--threads``; a finished or interrupted run resumes). Printed per cell: the
final validation mask AP of the original and of the variant (the last ``val/segm_AP`` in each
run's metrics.jsonl, the same measure for both: the final checkpoint validated during training;
the study's own table evaluates that checkpoint again with ``uplvp stage evaluate``, which can
differ by a few tenths, e.g. 7.9 vs 7.7 for knet 5 % seed 0), and their difference; then per group of cells (the cell name
without its seed) the means and the paired differences. ``--report-only`` prints without
running anything.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

SEED_PART = re.compile(r"-seed(\d+)")


class VariantError(Exception):
    """Bad input: printed as one error line."""


def parse_sets(items: list[str]) -> dict:
    """``["bce_weight=5.0", "train.max_steps=2000"]`` -> ``{"bce_weight": 5.0, "train.max_steps":
    2000}``; a key is a FinetuneConfig field or a dotted path into one of its sections."""
    from stages.finetune import FinetuneConfig

    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise VariantError(f"--set {item!r}: expected KEY=VALUE")
        top = key.split(".")[0]
        if top not in FinetuneConfig.model_fields or top in ("out", "resume") or "" in key.split("."):
            raise VariantError(f"--set {key}: not a fine-tuning option that a variant may change")
        options[key] = yaml.safe_load(text)
    return options


def original_config(study: Path, cell: str) -> dict:
    """The resolved fine-tuning config the cell ran with."""
    path = study / "finetune" / cell / "stage.json"
    if not path.is_file():
        raise VariantError(f"cell {cell}: no {path} (not a finished cell of that study)")
    return json.loads(path.read_text())["config"]


def variant_config(original: dict, options: dict, out: Path) -> dict:
    """``original`` with ``options`` applied (a dotted key changes one value inside a section,
    the rest of the section kept) and ``out`` as its run folder; the result must validate as a
    FinetuneConfig (a misspelt nested key is refused)."""
    from pydantic import ValidationError

    from stages.finetune import FinetuneConfig

    cfg = copy.deepcopy(original)
    for key, value in options.items():
        *sections, leaf = key.split(".")
        node = cfg
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise VariantError(f"--set {key}: {part} is not a section")
        node[leaf] = value
    cfg.update(out=str(out), resume=True)
    try:
        FinetuneConfig.model_validate(cfg)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise VariantError(f"--set: {where}: {first['msg']}") from None
    return cfg


def final_ap(run_dir: Path) -> tuple[int, float] | None:
    """(step, value) of the last logged ``val/segm_AP`` of a fine-tuning run; None when there
    is none yet."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    values = [(record["step"], record["val/segm_AP"]) for line in path.read_text().splitlines()
              if line.strip() for record in [json.loads(line)] if "val/segm_AP" in record]
    return values[-1] if values else None


def group_of(cell: str) -> str:
    return SEED_PART.sub("", cell)


def report(rows: list[tuple[str, tuple[int, float] | None, tuple[int, float] | None]],
           label: str) -> list[str]:
    """Lines: one per cell (original AP, variant AP, difference, in %; a variant that has not
    reached the original's last validation step shows its step and no difference), then one
    per group of finished cells (means, the paired difference's mean ± std, seeds that rose)."""
    lines = [f"{'cell':<28} {'original':>8} {label:>8} {'diff':>6}"]
    groups: dict[str, list[tuple[float, float]]] = {}
    for cell, before, after in rows:
        if before is None or after is None or after[0] < before[0]:
            shown = "-" if after is None else f"{100 * after[1]:.1f} (step {after[0]}, running)"
            lines.append(f"{cell:<28} {'-' if before is None else f'{100 * before[1]:.1f}':>8} {shown:>8}")
            continue
        b, a = before[1], after[1]
        lines.append(f"{cell:<28} {100 * b:8.1f} {100 * a:8.1f} {100 * (a - b):+6.1f}")
        groups.setdefault(group_of(cell), []).append((b, a))
    for group, pairs in groups.items():
        diffs = [a - b for b, a in pairs]
        lines.append(f"{group}: original {100 * statistics.mean(b for b, _ in pairs):.1f}, {label} "
                     f"{100 * statistics.mean(a for _, a in pairs):.1f}, paired "
                     f"{paired_difference(pairs)} ({sum(d > 0 for d in diffs)}/{len(diffs)} seeds up)")
    return lines


def paired_difference(pairs: list[tuple[float, float]]) -> str:
    """The mean ± std over seeds of ``after - before`` for (before, after) AP pairs, in points
    ("+0.7 ± 0.5"; no spread for one pair; a mean that rounds to zero prints as +0.0)."""
    diffs = [100 * (a - b) for b, a in pairs]
    spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
    return f"{round(statistics.mean(diffs), 1) + 0.0:+.1f}{spread}"


def run_variant(config_path: Path, log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [str(Path(sys.executable).parent / "uplvp"), "stage", "finetune", "--config",
               str(config_path)]
    with open(log, "w") as fh:
        code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise VariantError(f"uplvp stage finetune exited {code} (log: {log})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="the study folder")
    parser.add_argument("--out", type=Path, required=True, help="folder of the variant runs")
    parser.add_argument("--tag", required=True, help="suffix of the variant run folders")
    parser.add_argument("--cells", nargs="+", required=True, help="cell names, e.g. knet-1pct-seed0-full")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="KEY=VALUE: a fine-tuning option to change (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    try:
        options = parse_sets(args.sets)
        if not options and not args.report_only:
            raise VariantError("nothing to change: give at least one --set KEY=VALUE")
        args.out.mkdir(parents=True, exist_ok=True)
        rows = []
        for cell in args.cells:
            original = original_config(args.study, cell)
            run_dir = args.out / f"{cell}-{args.tag}"
            if not args.report_only:
                config_path = args.out / f"{cell}-{args.tag}.yaml"
                config_path.write_text(yaml.safe_dump(variant_config(original, options, run_dir)))
                print(f"running {run_dir} ...", flush=True)
                run_variant(config_path, args.out / f"{cell}-{args.tag}.log", args.threads)
            rows.append((cell, final_ap(args.study / "finetune" / cell), final_ap(run_dir)))
    except VariantError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"# {args.study} cells, originals vs {args.tag} ({', '.join(args.sets) or 'as kept'}): "
          "final validation mask AP in %")
    print("\n".join(report(rows, args.tag)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
