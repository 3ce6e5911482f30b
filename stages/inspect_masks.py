"""`uplvp inspect masks`: look at a ``propose`` output folder.

- :func:`summarize_masks` reads the small columns of every shard (never ``rle_counts``,
  ``clip_embedding`` or ``shape_grid``) and returns a JSON-ready summary: images ok / error,
  masks per label, fixed-bin score and area histograms, masks per image, images without masks
  and images that could not be read. :func:`print_mask_summary` prints it with rich text bars;
  :func:`run_inspect_masks` does both and optionally writes the summary as JSON.
- ``uplvp inspect overlay`` is ``stages/inspect_overlay.py`` (drawing: ``pipeline/overlays.py``).

Shard folders are found and validated by ``pipeline.shard_dataset`` (the same checks the
pre-training loader makes), so a folder this module accepts is one training accepts.
Formats: ``docs/shards.md``; the commands: ``docs/inspect.md``.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.atomic import write_json_atomic
from pipeline.errors import InputError
from pipeline.shard_dataset import find_shards
from pipeline.shards import read_metadata, read_shard_columns

# Fixed histogram bins. Scores: [0.0, 0.1), ..., [0.9, 1.0] (last bin closed). Areas in pixels:
# [0, 32), [32, 128), ... growing by 4x, the last bin open ([524288, inf)).
SCORE_EDGES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
AREA_EDGES: tuple[float, ...] = (0, 32, 128, 512, 2048, 8192, 32768, 131072, 524288, float("inf"))
NUM_EXAMPLES = 5  # paths / errors listed for images without masks and error images
LABELS_SHOWN = 20  # label rows printed (the JSON has all)
BAR_WIDTH = 40

_SUMMARY_MASK_COLUMNS = ["image_id", "area", "score", "label"]
_SUMMARY_IMAGE_COLUMNS = ["image_id", "image_path", "status", "error", "num_masks"]
_SHARD_NAME = re.compile(r"shard-(\d+)\.parquet")


# --------------------------------------------------------------------------- summary


def summarize_masks(shard_dir: str | Path) -> dict[str, Any]:
    """Summarise the proposal shards of a ``propose`` output folder.

    Every shard is validated (format version, column types, masks and images files of the same
    run, one config hash for the folder); each images file's ``num_masks`` must match its
    masks file's rows and every score must lie in [0, 1], else :class:`InputError` naming the
    file. Masks files without an images file (a shard being written, or a killed run) are left
    out and listed under ``incomplete_shards``.

    Returns a JSON-ready dict::

        folder, config_hash, shards (int), incomplete_shards [int],
        images {total, ok, error}, masks (int),
        labels [{label, masks, mean_score}]   most masks first, then by label,
        score_histogram [{min, max, masks}]   bins of SCORE_EDGES, [min, max), last closed,
        area_histogram [{min, max, masks}]    bins of AREA_EDGES in pixels, last max null (inf),
        masks_per_image {mean, median, max}   over images with status ok (null if none),
        images_without_masks {count, examples [image_path]}          first by image id,
        image_errors {count, examples [{image_id, image_path, error}]} first by image id.
    """
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise InputError("proposal folder not found", shard_dir)
    shards = find_shards(shard_dir)
    mask_parts, image_parts = [], []
    for shard in shards:
        masks = read_shard_columns(shard.masks, _SUMMARY_MASK_COLUMNS).to_pandas()
        images = read_shard_columns(shard.images, _SUMMARY_IMAGE_COLUMNS).to_pandas()
        _check_shard_rows(masks, images, shard.masks, shard.images)
        mask_parts.append(masks)
        image_parts.append(images)
    masks = pd.concat(mask_parts, ignore_index=True)
    images = pd.concat(image_parts, ignore_index=True).sort_values("image_id", kind="stable")
    ok = images[images["status"] == "ok"]
    empty = ok[ok["num_masks"] == 0]
    errors = images[images["status"] == "error"]
    return {
        "folder": str(shard_dir),
        "config_hash": read_metadata(shards[0].images).get("config_hash"),
        "shards": len(shards),
        "incomplete_shards": _incomplete_shards(shard_dir),
        "images": {"total": len(images), "ok": len(ok), "error": len(errors)},
        "masks": len(masks),
        "labels": _label_counts(masks),
        "score_histogram": histogram(masks["score"].to_numpy(np.float32), SCORE_EDGES),
        "area_histogram": histogram(masks["area"].to_numpy(np.float64), AREA_EDGES),
        "masks_per_image": _masks_per_image(ok["num_masks"].to_numpy()),
        "images_without_masks": {
            "count": len(empty),
            "examples": empty["image_path"].head(NUM_EXAMPLES).tolist(),
        },
        "image_errors": {
            "count": len(errors),
            "examples": [
                {"image_id": int(r.image_id), "image_path": r.image_path, "error": r.error}
                for r in errors.head(NUM_EXAMPLES).itertuples()
            ],
        },
    }


def histogram(values: np.ndarray, edges: tuple[float, ...]) -> list[dict[str, Any]]:
    """Counts of ``values`` (1-D) in the bins ``[edges[i], edges[i+1])``; the last bin also
    holds values equal to its upper edge, values below ``edges[0]`` fall in the first bin.
    Edges are compared in the values' dtype (so a float32 score of 0.7 lands in [0.7, 0.8)).
    Returns ``[{"min", "max", "masks"}]`` with ``max`` None for an infinite edge."""
    inner = np.asarray(edges[1:-1], dtype=values.dtype)
    counts = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(edges) - 1)
    return [
        {"min": lo, "max": None if np.isinf(hi) else hi, "masks": int(n)}
        for lo, hi, n in zip(edges[:-1], edges[1:], counts)
    ]


def print_mask_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """Print a :func:`summarize_masks` summary: header lines, the label table, the two
    histograms as text bars, and the images without masks / with errors."""
    out = console or Console()
    say = functools.partial(out.print, soft_wrap=True)  # long paths stay on one line
    images, per_image = summary["images"], summary["masks_per_image"]
    shards = summary["shards"]
    say(Text(f"proposal shards: {summary['folder']} ({shards} shard{'s' * (shards != 1)}, "
             f"config {summary['config_hash']})"))
    if summary["incomplete_shards"]:
        say(Text(f"incomplete shards left out (masks file without images file): "
                 f"{_index_list(summary['incomplete_shards'])}", style="yellow"))
    line = (f"images: {images['total']} (ok {images['ok']}, error {images['error']}); "
            f"masks: {summary['masks']}")
    if per_image["mean"] is not None:
        line += (f"; masks per image: mean {per_image['mean']:.1f}, "
                 f"median {per_image['median']:g}, max {per_image['max']}")
    say(Text(line))
    out.print(_label_table(summary["labels"]))
    out.print(_histogram_table("score", summary["score_histogram"], _score_bin))
    out.print(_histogram_table("area (px)", summary["area_histogram"], _area_bin))
    empty = summary["images_without_masks"]
    say(Text(f"images with no masks: {empty['count']}"))
    for path in empty["examples"]:
        say(Text(f"  {path}"))
    _print_more(say, empty["count"], len(empty["examples"]))
    errors = summary["image_errors"]
    say(Text(f"images with status error: {errors['count']}"))
    for item in errors["examples"]:
        say(Text(f"  {item['image_path']}: {item['error']}"))
    _print_more(say, errors["count"], len(errors["examples"]))


def run_inspect_masks(
    shard_dir: str | Path, json_out: str | Path | None = None, console: Console | None = None
) -> dict[str, Any]:
    """`uplvp inspect masks DIR [--json FILE]`: summarise, print, and write the summary as
    JSON (atomically) when ``json_out`` is given; returns the summary."""
    summary = summarize_masks(shard_dir)
    print_mask_summary(summary, console)
    if json_out is not None:
        write_json_atomic(json_out, summary, indent=2)
    return summary


def _check_shard_rows(
    masks: pd.DataFrame, images: pd.DataFrame, masks_path: Path, images_path: Path
) -> None:
    """The two files of one shard agree, statuses are known and scores lie in [0, 1]."""
    bad_status = images[~images["status"].isin(["ok", "error"])]
    if len(bad_status):
        row = bad_status.iloc[0]
        raise InputError(f"image id {row.image_id}: status {row.status!r} is not 'ok' or "
                         "'error'", images_path)
    scores = masks["score"].to_numpy()
    bad_score = ~((scores >= 0) & (scores <= 1))  # also catches NaN
    if bad_score.any():
        row = masks[bad_score].iloc[0]
        raise InputError(f"image id {row.image_id}: score {row.score} is outside [0, 1]",
                         masks_path)
    counts = masks["image_id"].value_counts()
    declared = images.set_index("image_id")["num_masks"]
    stray = counts.index.difference(declared.index)
    if len(stray):
        raise InputError(f"rows for image id {stray[0]} that {images_path.name} does not list",
                         masks_path)
    found = counts.reindex(declared.index, fill_value=0)
    differ = declared.to_numpy() != found.to_numpy()
    if differ.any():
        image_id = declared.index[differ.argmax()]
        raise InputError(
            f"image id {image_id}: num_masks is {declared[image_id]} but the masks file "
            f"{masks_path.name} has {found[image_id]} rows for it",
            images_path,
        )


def _incomplete_shards(shard_dir: Path) -> list[int]:
    """Indices of masks files that have no images file next to them."""
    indices = []
    for path in sorted((shard_dir / "masks").glob("shard-*.parquet")):
        match = _SHARD_NAME.fullmatch(path.name)
        if match and not (shard_dir / "images" / path.name).is_file():
            indices.append(int(match.group(1)))
    return indices


def _label_counts(masks: pd.DataFrame) -> list[dict[str, Any]]:
    grouped = masks.groupby("label", sort=True)["score"].agg(["size", "mean"])
    grouped = grouped.sort_values("size", ascending=False, kind="stable")
    return [
        {"label": label, "masks": int(row["size"]), "mean_score": round(float(row["mean"]), 4)}
        for label, row in grouped.iterrows()
    ]


def _masks_per_image(num_masks: np.ndarray) -> dict[str, float | int | None]:
    if len(num_masks) == 0:
        return {"mean": None, "median": None, "max": None}
    return {
        "mean": round(float(np.mean(num_masks)), 4),
        "median": float(np.median(num_masks)),
        "max": int(np.max(num_masks)),
    }


def _label_table(labels: list[dict[str, Any]]) -> Table:
    table = Table(title="masks per label", title_justify="left", box=None, pad_edge=False)
    table.add_column("label")
    table.add_column("masks", justify="right")
    table.add_column("mean score", justify="right")
    for item in labels[:LABELS_SHOWN]:
        table.add_row(Text(item["label"]), str(item["masks"]), f"{item['mean_score']:.3f}")
    if len(labels) > LABELS_SHOWN:
        table.add_row(Text(f"... {len(labels) - LABELS_SHOWN} more labels (see --json)"), "", "")
    return table


def _histogram_table(
    title: str, bins: list[dict[str, Any]], name: Callable[[dict[str, Any]], str]
) -> Table:
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    table.add_column("bin")
    table.add_column("", min_width=BAR_WIDTH)
    table.add_column("masks", justify="right")
    peak = max((b["masks"] for b in bins), default=0)
    for b in bins:
        table.add_row(name(b), Text(_bar(b["masks"], peak), style="cyan"), str(b["masks"]))
    return table


def _bar(count: int, peak: int) -> str:
    """A bar of ``BAR_WIDTH * count / peak`` blocks, at least one for a non-empty bin."""
    if count == 0:
        return ""
    return "█" * max(1, round(BAR_WIDTH * count / peak))


def _score_bin(b: dict[str, Any]) -> str:
    return f"[{b['min']:.1f}, {b['max']:.1f}{']' if b['max'] == SCORE_EDGES[-1] else ')'}"


def _area_bin(b: dict[str, Any]) -> str:
    return f"[{b['min']:g}, {'inf' if b['max'] is None else format(b['max'], 'g')})"


def _index_list(indices: list[int]) -> str:
    shown = ", ".join(str(k) for k in indices[:10])
    return shown + (f" ... ({len(indices)} in all)" if len(indices) > 10 else "")


def _print_more(say: Callable[[Text], None], count: int, shown: int) -> None:
    if count > shown:
        say(Text(f"  ... {count - shown} more (see --json)"))


# --------------------------------------------------------------------------- overlay
