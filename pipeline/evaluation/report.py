"""Terminal output of evaluation and prediction: the per-category AP table and the lines
about images that could not be read."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

UNREADABLE_SHOWN = 10  # unreadable images listed on the terminal (all are in the outputs)
console = Console(stderr=True)


def report_unreadable(unreadable: Sequence[dict], num_images: int, stage: str, listed_in: Path,
                      consequence: str, out: Console | None = None) -> None:
    """One line per unreadable image (the first :data:`UNREADABLE_SHOWN`) and a total line;
    nothing when every image was read."""
    if not unreadable:
        return
    out = out or console
    out.print(f"{stage}: {len(unreadable)} of {num_images} images could not be read, "
              f"{consequence} (all listed in {listed_in}):", highlight=False)
    for row in unreadable[:UNREADABLE_SHOWN]:
        out.print(f"  {row['file_name']}: {row['error']}", highlight=False)
    if len(unreadable) > UNREADABLE_SHOWN:
        out.print(f"  ... and {len(unreadable) - UNREADABLE_SHOWN} more", highlight=False)


def print_metrics(report: dict, out: Console | None = None) -> None:
    """The summary line and the per-category AP table (AP in %, '-' where undefined)."""
    out = out or Console()
    table = Table(title=f"per-category AP ({report['dataset']['name']})")
    for column in ("id", "category", "instances", "mask AP", "box AP"):
        table.add_column(column, justify="left" if column == "category" else "right")
    box_rows = {r["category_id"]: r for r in report["per_category"].get("bbox", [])}
    for row in report["per_category"]["segm"]:
        table.add_row(str(row["category_id"]), row["name"], str(row["num_gt"]),
                      _percent(row["AP"]),
                      _percent(box_rows.get(row["category_id"], {}).get("AP")))
    out.print(table)
    for iou_type in ("segm", "bbox"):
        if iou_type in report:
            values = ", ".join(f"{k} {_percent(v)}" for k, v in report[iou_type].items())
            out.print(f"{iou_type}: {values}")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
