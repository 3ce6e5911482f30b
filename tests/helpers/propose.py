"""Running the propose stage through the CLI on a small pool, and reading its shards back."""
from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from stages.cli import app

runner = CliRunner()


def propose(manifest, out, *args):
    result = runner.invoke(
        app,
        ["stage", "propose", "--images", str(manifest), "--out", str(out), "--shard-size", "3",
         "--num-workers", "0", "--no-progress", *map(str, args)],
    )
    return result


def read(out):
    masks = pd.read_parquet(out / "masks").sort_values(["image_id", "mask_index"])
    images = pd.read_parquet(out / "images").sort_values("image_id")
    return masks.reset_index(drop=True), images.reset_index(drop=True)
