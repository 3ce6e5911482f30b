"""The study at one look: one markdown table over several study folders (settings).

    .venv/bin/python -m experiments.study_overview \\
        --setting "real photos, paper's setting=experiments/results/study_real" \\
        --setting "synthetic, paper's setting=experiments/results/study_paper_synth" \\
        --setting "synthetic, random backbones (phase 11)=experiments/results/study_knetprev"

Each ``--setting NAME=FOLDER`` is a study folder (``--out`` of ``low_data_study.py`` or its
``--export`` copy); ``NAME=FOLDER+PEER_FOLDER`` takes the Mask R-CNN cells from another folder of
the same benchmark (phase 11 compared with phase 9's). One row per (setting, decoder, regime, arm): mask AP mean ± sd over seeds,
class-agnostic mask AP where the cells have it, the ratio of the means to the scratch arm of the
same decoder and to Mask R-CNN's scratch arm at the same regime, and the number of seeds on which
the arm's AP is at least Mask R-CNN's (paired by seed). Rows come from
``low_data_study.summarise``, the function behind each folder's own report.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from experiments.low_data_study import PEER_DECODERS, cell_key, read_results, summarise
from pipeline.splits import format_percent


def seeds_at_least_peer(records: list[dict], decoder: str, regime: float, arm: str) -> str:
    """"k/n": seeds where the cell's AP >= the Mask R-CNN cell's AP of the same regime and
    seed ("-" for the peer itself or without peer cells)."""
    if decoder in PEER_DECODERS:
        return "-"
    peer = {(r["regime"], r["seed"]): r["AP"] for r in records
            if r["decoder"] in PEER_DECODERS and r["arm"] == "scratch"}
    mine = [r for r in records if (r["decoder"], r["regime"], r["arm"]) == (decoder, regime, arm)
            and (r["regime"], r["seed"]) in peer]
    if not mine:
        return "-"
    wins = sum(r["AP"] >= peer[(r["regime"], r["seed"])] for r in mine)
    return f"{wins}/{len(mine)}"


def setting_records(folder: Path, peer_folder: Path | None = None) -> list[dict]:
    """The cells of a study folder; with ``peer_folder``, plus the Mask R-CNN cells of that
    folder (a phase that compared against an earlier phase's peer cells), their runs given as
    absolute paths so that their curves are found."""
    records = read_results(folder)
    if peer_folder is not None:
        records = [r for r in records if r["decoder"] not in PEER_DECODERS] + [
            {**r, "run": str((peer_folder / r["run"]).resolve())}
            for r in read_results(peer_folder) if r["decoder"] in PEER_DECODERS]
    if not records:
        raise SystemExit(f"error: {folder} holds no results.jsonl rows")
    seen = set()
    for r in records:
        if cell_key(r) in seen:
            raise SystemExit(f"error: {folder}: cell {cell_key(r)} recorded twice")
        seen.add(cell_key(r))
    return records


def overview(settings: list[tuple[str, Path, Path | None]], arms: list[str] | None = None) -> str:
    """The table; ``arms`` keeps only those arms (and Mask R-CNN), in the folders' order."""
    header = ("| setting | decoder | labeled | arm | seeds | mask AP | class-agnostic AP | "
              "AP / scratch | AP / Mask R-CNN | seeds >= Mask R-CNN |\n" + "|---" * 10 + "|\n")
    lines = []
    for name, folder, peer_folder in settings:
        records = setting_records(folder, peer_folder)
        for row in summarise(folder, records):
            if arms and row["arm"] not in arms and row["decoder"] not in PEER_DECODERS:
                continue
            lines.append(
                f"| {name} | {row['decoder']} | {format_percent(row['regime'])}% | {row['arm']} | "
                f"{row['seeds']} | {row['AP']} | {row.get('AP_agnostic') or '-'} | "
                f"{row['ratio']} | {row['vs_peer']} | "
                f"{seeds_at_least_peer(records, row['decoder'], row['regime'], row['arm'])} |")
    return header + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", required=True,
                        help="NAME=FOLDER, or NAME=FOLDER+PEER_FOLDER to take the Mask R-CNN "
                             "cells from another study folder of the same benchmark")
    parser.add_argument("--arms", nargs="+", help="only these arms (Mask R-CNN rows are kept)")
    args = parser.parse_args()
    settings = []
    for item in args.setting:
        name, sep, folders = item.partition("=")
        folder, _, peer = folders.partition("+")
        if not sep or not Path(folder).is_dir() or (peer and not Path(peer).is_dir()):
            raise SystemExit(f"error: --setting {item!r}: expected NAME=FOLDER[+PEER_FOLDER] of "
                             "studies")
        settings.append((name, Path(folder), Path(peer) if peer else None))
    print(overview(settings, args.arms), end="")


if __name__ == "__main__":
    main()
