"""Validation-AP curves of fine-tuning arms compared: when one reaches another's final AP, the
final ratio, and the plot (the demo and the low-data study)."""
from __future__ import annotations

from pathlib import Path

from pipeline.atomic import atomic_path


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose AP is >= ``target`` (None if never)."""
    return next((s for s, ap in curve if ap >= target), None)


def compare_arms(reports: dict[str, dict], curves: dict[str, list]) -> dict:
    """Final AP/AP50/AP75 of each arm (``reports``: evaluation reports; ``curves``: validation
    (step, AP) per arm, with a ``"scratch"`` and a ``"pretrained"`` arm) and the steps each needs
    to reach scratch's final AP; the pre-trained / scratch AP ratio."""
    # target: the scratch run's last validation AP (same in-training evaluation as the curves)
    scratch_final = curves["scratch"][-1][1] if curves["scratch"] else (
        reports["scratch"]["segm"]["AP"] or 0.0)
    rows = {}
    for arm in reports:
        segm = reports[arm]["segm"]
        rows[arm] = {
            "AP": segm["AP"], "AP50": segm["AP50"], "AP75": segm["AP75"],
            "final_step": curves[arm][-1][0] if curves[arm] else None,
            "steps_to_scratch_final_AP": steps_to_reach(curves[arm], scratch_final),
        }
    scratch_ap = rows["scratch"]["AP"] or 0.0
    ratio = (rows["pretrained"]["AP"] or 0.0) / scratch_ap if scratch_ap > 0 else None
    return {"arms": rows, "AP_ratio_pretrained_over_scratch": ratio}


def plot_ap_curves(curves: dict[str, list], path: Path,
                   title: str = "UPLVP demo: pre-trained vs scratch") -> Path:
    """Validation mask AP (%) against fine-tuning step, one line per arm, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for arm, points in curves.items():
        if points:
            steps, aps = zip(*points)
            ax.plot(steps, [100 * a for a in aps], marker="o", markersize=3, label=arm)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("val mask AP (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path
