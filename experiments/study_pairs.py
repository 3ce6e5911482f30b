"""Two low-data study folders compared cell by cell, paired by seed (an ablation against its base).

    .venv/bin/python -m experiments.study_pairs --base experiments/results/study_paper_synth \\
        --variant experiments/results/study_ablate_num_kernels

For every (decoder, labeled %, arm) the two folders share, printed per seed: the final mask AP of
the base cell and of the variant cell (the ``AP`` the study recorded in ``results.jsonl``, in
points) and their difference; then the means over the seeds both folders hold, the paired
difference (mean ± sd) and how many seeds rose. A cell only one folder holds is listed as such
and left out of the pairs. With ``--peer DIR`` (a folder holding Mask R-CNN cells of the same
data), the variant's mean is also divided by the peer's mean at that regime.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from experiments.low_data_study import PEER_DECODERS, read_results
from experiments.study_cell_variant import paired_difference
from pipeline.splits import format_percent


class PairsError(Exception):
    """Bad input: printed as one error line."""


def cells(folder: Path) -> dict[tuple, float]:
    """(decoder, regime, arm, seed) -> recorded mask AP of a study folder."""
    if not (folder / "results.jsonl").is_file():
        raise PairsError(f"{folder}: no results.jsonl (not a low-data study folder)")
    return {(r["decoder"], float(r["regime"]), r["arm"], int(r["seed"])): float(r["AP"])
            for r in read_results(folder)}


def pairs_report(base: Path, variant: Path, peer: Path | None = None) -> str:
    base_cells, variant_cells = cells(base), cells(variant)
    peer_cells = cells(peer) if peer is not None else {}
    groups = sorted({key[:3] for key in base_cells} & {key[:3] for key in variant_cells})
    if not groups:
        raise PairsError(f"{base} and {variant} share no (decoder, regime, arm)")
    lines = [f"# base: {base}", f"# variant: {variant}", "# mask AP in points (COCO mask AP x 100)"]
    for decoder, regime, arm in groups:
        seeds = sorted({key[3] for key in base_cells if key[:3] == (decoder, regime, arm)}
                       | {key[3] for key in variant_cells if key[:3] == (decoder, regime, arm)})
        lines.append(f"\n{decoder} {format_percent(regime)}% {arm}")
        lines.append("seed   base  variant  difference")
        paired = []
        for seed in seeds:
            b = base_cells.get((decoder, regime, arm, seed))
            v = variant_cells.get((decoder, regime, arm, seed))
            if b is None or v is None:
                where = "base" if b is not None else "variant"
                lines.append(f"{seed:>4}  only in the {where} folder: left out")
                continue
            paired.append((b, v))
            lines.append(f"{seed:>4}  {100 * b:5.1f}  {100 * v:7.1f}  {100 * (v - b):+10.1f}")
        if not paired:
            continue
        rose = sum(v > b for b, v in paired)
        line = (f"mean over {len(paired)} paired seed(s): base "
                f"{100 * statistics.mean(b for b, _ in paired):.1f}, variant "
                f"{100 * statistics.mean(v for _, v in paired):.1f}, difference "
                f"{paired_difference(paired)}, {rose}/{len(paired)} seeds up")
        peers = [ap for (d, r, a, _), ap in peer_cells.items()
                 if d in PEER_DECODERS and r == regime and a == "scratch"]
        if peers:
            ratio = statistics.mean(v for _, v in paired) / statistics.mean(peers)
            line += (f"; variant / Mask R-CNN {ratio:.2f}x (Mask R-CNN "
                     f"{100 * statistics.mean(peers):.1f}, {len(peers)} seed(s))")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the study folder to compare with")
    parser.add_argument("--variant", type=Path, required=True, help="the study folder with one change")
    parser.add_argument("--peer", type=Path, help="a study folder with the Mask R-CNN cells")
    args = parser.parse_args(argv)
    try:
        print(pairs_report(args.base, args.variant, args.peer), end="")
    except PairsError as err:
        raise SystemExit(f"error: {err}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
