"""`uplvp data synth|split|convert|check`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.cli.common import convert_app, data_app
from stages.cli.config_help import config_command
from stages.cli.options import PROGRESS, Given, config_options
from stages.errors import fail, user_errors

# --------------------------------------------------------------------------- data


@data_app.command("synth", cls=config_command("stages.data:SynthConfig"))
@user_errors
@config_options(PROGRESS)
def data_synth(
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default 0)."),
    num_unlabeled: Optional[int] = typer.Option(None, help="Unlabeled pool size (default 300)."),
    num_train: Optional[int] = typer.Option(None, help="Labeled train images (default 60)."),
    num_val: Optional[int] = typer.Option(None, help="Labeled val images (default 60)."),
    image_size: Optional[int] = typer.Option(None, help="Base image side in px (default 128)."),
    *,
    given: Given,
) -> None:
    """Write the deterministic synthetic demo dataset: unlabeled pool, train and val sets
    (COCO JSON, polygon segmentations) and their manifests."""
    from stages.data import SynthConfig, run_synth

    run_synth(given.load(SynthConfig), progress=given.progress)


@data_app.command("split", context_settings={"allow_extra_args": True},
                  cls=config_command("stages.data:SplitConfig"))
@user_errors
@config_options(keys={"ctx": None, "percent": None, "seed": None})
def data_split(
    ctx: typer.Context,
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="COCO JSON to split."),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", help="Labeled manifest to split (instead of --annotations)."
    ),
    images_root: Optional[Path] = typer.Option(
        None, "--images-root", help="Image folder for the written manifests."
    ),
    percent: Optional[list[str]] = typer.Option(
        None, "--percent", help="Percentages, e.g. --percent 1 5 10 (default 1 5 10)."
    ),
    seed: Optional[list[int]] = typer.Option(None, "--seed", help="Seed(s) (default 1)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (default: beside the annotations)."
    ),
    *,
    given: Given,
) -> None:
    """Seeded image-level low-data subsets, named like instances_train2017.{seed}@{percent}.json,
    plus a manifest for each. One seed gives nested subsets (1% in 5% in 10%)."""
    from stages.data import SplitConfig, run_split

    percents = _parse_numbers("--percent", (percent or []) + list(ctx.args))
    run_split(given.load(SplitConfig, percent=percents or None, seed=seed or None))


def _parse_numbers(option: str, values: list[str]) -> list[float]:
    """``['1', '5,10']`` -> ``[1.0, 5.0, 10.0]``; anything else is one error line."""
    numbers = []
    for value in values:
        for part in str(value).split(","):
            if not part.strip():
                continue
            try:
                numbers.append(float(part))
            except ValueError:
                raise fail(f"{option}: '{part}' is not a number") from None
    return numbers


@convert_app.command("cityscapes", cls=config_command("stages.data:CityscapesConfig"))
@user_errors
@config_options(PROGRESS)
def convert_cityscapes(
    root: Optional[Path] = typer.Option(None, "--root", help="Cityscapes root (gtFine/, leftImg8bit/)."),
    split: Optional[str] = typer.Option(None, "--split", help="train | val | test (default train)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output COCO JSON."),
    min_area: Optional[int] = typer.Option(None, help="Drop instances smaller than this (px)."),
    *,
    given: Given,
) -> None:
    """Cityscapes gtFine *_instanceIds.png -> COCO instances JSON (8 instance classes)."""
    from stages.data import CityscapesConfig, run_convert_cityscapes

    run_convert_cityscapes(given.load(CityscapesConfig), progress=given.progress)


@convert_app.command("ctw1500", cls=config_command("stages.data:Ctw1500Config"))
@user_errors
@config_options(PROGRESS)
def convert_ctw1500(
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of CTW1500 images."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Folder of label .txt files."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output COCO JSON."),
    label_format: Optional[str] = typer.Option(
        None, "--label-format", help="auto | curve | polygon (default auto)."
    ),
    *,
    given: Given,
) -> None:
    """CTW1500 curved-text polygons -> COCO instances JSON (one category: text)."""
    from stages.data import Ctw1500Config, run_convert_ctw1500

    run_convert_ctw1500(given.load(Ctw1500Config), progress=given.progress)


@data_app.command("check")
@user_errors
def data_check(manifest: Path = typer.Argument(..., help="Manifest YAML to validate.")) -> None:
    """Validate a dataset manifest (and its COCO file) and print a summary."""
    from stages.data import run_check

    run_check(manifest)
