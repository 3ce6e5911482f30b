"""`uplvp demo` for several seeds, as a user runs it: one line per seed.

    .venv/bin/python -m benchmarks.demo_seeds --seeds 0 1 2 --out runs/demo_seeds

Each seed runs ``uplvp demo --seed S --out OUT/seed-S`` as its own process (wall time includes
start-up, every stage, evaluation, overlays and the plot, as ``time uplvp demo`` measures it)
and is read back from its ``demo_summary.json``. Printed per seed: seconds, final val mask AP
of both arms, their ratio, and the fine-tuning step at which the pre-trained arm first reached
the scratch arm's final AP (and its share of the fine-tuning steps); then the issue's targets
(ratio >= 1.5, reached within <= 25 % of the steps, <= 480 s) checked on every seed.
A finished seed folder is not rerun (the demo resumes): pass a new ``--out`` to measure time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RATIO_TARGET = 1.5
REACH_TARGET = 0.25
SECONDS_TARGET = 480.0


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    """Run the demo for ``seed`` (unless its summary exists) and return its summary, with the
    measured wall time under ``wall_seconds`` (None when it was not run now)."""
    summary_path = out / "demo_summary.json"
    wall = None
    if not summary_path.is_file():
        command = [str(Path(sys.executable).parent / "uplvp"), "demo", "--seed", str(seed),
                   "--out", str(out), "--no-progress", *extra]
        log = out.parent / f"seed-{seed}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(log, "w") as fh:
            code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"error: seed {seed}: uplvp demo exited {code} (log: {log})")
    summary = json.loads(summary_path.read_text())
    summary["wall_seconds"] = wall
    return summary


def seed_line(seed: int, summary: dict) -> tuple[str, bool]:
    """The printed line of one seed and whether it meets every target."""
    pre, scratch = summary["arms"]["pretrained"], summary["arms"]["scratch"]
    ratio = summary["AP_ratio_pretrained_over_scratch"]
    reach, final = pre["steps_to_scratch_final_AP"], pre["final_step"]
    share = reach / final if reach is not None and final else None
    seconds = summary["wall_seconds"] if summary["wall_seconds"] is not None else summary["seconds"]
    ok = (ratio is not None and ratio >= RATIO_TARGET and share is not None
          and share <= REACH_TARGET and seconds <= SECONDS_TARGET)
    reach_text = f"{reach} of {final} ({100 * share:.0f}%)" if share is not None else "never"
    ratio_text = f"{ratio:.2f}" if ratio is not None else "-"
    line = (f"{seed:>4}  {seconds:7.1f}  {100 * (pre['AP'] or 0):6.1f}  "
            f"{100 * (scratch['AP'] or 0):6.1f}  {ratio_text:>5}  {reach_text:>26}  "
            f"{'yes' if ok else 'NO':>7}")
    return line, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    parser.add_argument("demo_args", nargs="*", help="more `uplvp demo` options, after --")
    args = parser.parse_args(argv)
    print(f"# uplvp demo per seed (targets: AP ratio >= {RATIO_TARGET}, scratch's final AP "
          f"reached within <= {100 * REACH_TARGET:.0f}% of the fine-tuning steps, "
          f"<= {SECONDS_TARGET:.0f} s)")
    print(f"seed  seconds  pre AP  scr AP  ratio  {'pre reaches scr final AP at':>26}  targets")
    all_ok = True
    for seed in args.seeds:
        line, ok = seed_line(seed, run_seed(seed, args.out / f"seed-{seed}", args.demo_args))
        all_ok &= ok
        print(line, flush=True)
    print(f"all seeds meet the targets: {'yes' if all_ok else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
