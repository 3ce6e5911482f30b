"""`uplvp inspect masks|overlay|run`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.cli.common import (
    inspect_app,
)
from stages.errors import user_errors

@inspect_app.command("masks")
@user_errors
def inspect_masks(
    shard_dir: Path = typer.Argument(..., help="A propose output folder."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON."),
) -> None:
    """Counts per label, score/area histograms, images without masks or unreadable."""
    from stages.inspect_masks import run_inspect_masks

    run_inspect_masks(shard_dir, json_out)


@inspect_app.command("overlay")
@user_errors
def inspect_overlay(
    shard_dir: Path = typer.Argument(..., help="A propose output folder."),
    image_id: int = typer.Option(..., "--image-id", help="The image's id (see images/ shards)."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
    min_score: float = typer.Option(0.0, help="Draw masks scoring at least this."),
    max_masks: int = typer.Option(20, help="Draw at most this many (best first)."),
) -> None:
    """Draw one image's pseudo masks (fill, contour, box, label and score) on it."""
    from stages.inspect_overlay import draw_overlay

    result = draw_overlay(shard_dir, image_id, out, min_score=min_score, max_masks=max_masks)
    typer.echo(f"wrote {result.path}: {result.masks_drawn} of {result.masks_total} masks of "
               f"image {result.image_id} ({result.image_path})")


@inspect_app.command("run")
@user_errors
def inspect_run(
    run_dir: Path = typer.Argument(..., help="A pretrain or finetune run folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG path (default RUN/curves.png)."),
) -> None:
    """Plot a training run's loss and AP curves (from its metrics.jsonl) to a PNG."""
    from stages.inspect_run import plot_run

    typer.echo(f"wrote {plot_run(run_dir, out)}")
