"""`uplvp inspect run`: loss and AP curves of a training run as one PNG.

Reads ``<run_dir>/metrics.jsonl`` (one JSON object per line, written by
``pipeline.engine.metrics``). Every line needs a ``step``. Curves:

- losses: on lines that are not evaluation lines, the keys ``loss`` (the total, thick) and
  ``loss_<term>`` of the last decoder stage (``*_aux<i>`` terms are left out to keep it legible);
- AP: on evaluation lines (``"kind": "eval"``, or any line with ``val/`` keys), the keys ending
  in ``_AP``, ``_AP50`` or ``_AP75`` (e.g. ``val/segm_AP``), in %.

Drawn with matplotlib's Agg canvas (no display, the global backend is left alone).
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.atomic import atomic_path
from pipeline.engine.metrics import METRICS_FILE, is_number, read_metrics
from pipeline.errors import InputError

DEFAULT_PLOT = "curves.png"
_LOSS_KEY = re.compile(r"^loss(_(?!.*_aux\d+$)\w+)?$")
_AP_KEY = re.compile(r"_AP(50|75)?$")

Series = dict[str, tuple[list[int], list[float]]]


def curves(records: list[dict]) -> tuple[Series, Series]:
    """``(losses, aps)``: key -> (steps, values), both in file order; non-finite values and
    non-numbers are skipped."""
    losses: Series = defaultdict(lambda: ([], []))
    aps: Series = defaultdict(lambda: ([], []))
    for record in records:
        is_eval = record.get("kind") == "eval" or any(k.startswith("val/") for k in record)
        for key, value in record.items():
            if not is_number(value) or not math.isfinite(value):
                continue
            if is_eval and _AP_KEY.search(key):
                target = aps
            elif not is_eval and _LOSS_KEY.match(key):
                target = losses
            else:
                continue
            target[key][0].append(int(record["step"]))
            target[key][1].append(float(value))
    return dict(losses), dict(aps)


def plot_run(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """Plot the loss and AP curves of ``run_dir``'s ``metrics.jsonl`` into ``out_png``
    (default ``<run_dir>/curves.png``), written atomically; returns its path."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    losses, aps = curves(read_metrics(path))
    if not losses and not aps:
        raise InputError("no loss or AP values to plot", path)
    out_png = Path(out_png) if out_png is not None else run_dir / DEFAULT_PLOT

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_ap = fig.subplots(1, 2)
    for key, (steps, values) in sorted(losses.items()):
        ax_loss.plot(steps, values, label=key, linewidth=2.2 if key == "loss" else 1.0)
    ax_loss.set(title="training losses", xlabel="step", ylabel="loss")
    if losses and all(v > 0 for _, values in losses.values() for v in values):
        ax_loss.set_yscale("log")
    for key, (steps, values) in sorted(aps.items()):
        ax_ap.plot(steps, [100 * v for v in values], marker="o", label=key)
    ax_ap.set(title="validation AP", xlabel="step", ylabel="AP (%)")
    if not aps:
        ax_ap.text(0.5, 0.5, "no evaluation yet", ha="center", va="center",
                   transform=ax_ap.transAxes)
    for ax, series in ((ax_loss, losses), (ax_ap, aps)):
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize="small")
    fig.suptitle(str(run_dir))
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out_png
