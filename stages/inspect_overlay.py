"""`uplvp inspect overlay`: one image's pseudo masks drawn on the image (fill, contour, box,
"label score") as a PNG of the image's size as proposed (``pipeline/overlays.py`` draws)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from pipeline.atomic import write_bytes_atomic
from pipeline.errors import InputError
from pipeline.images import ImageReadError, read_image_rgb
from pipeline.overlays import render_overlay
from pipeline.shard_dataset import find_shards
from pipeline.shards import read_shard_columns

_OVERLAY_MASK_COLUMNS = ["mask_index", "rle_counts", "bbox", "score", "label"]
_OVERLAY_IMAGE_COLUMNS = ["image_id", "image_path", "height", "width", "status", "error"]


@dataclass(frozen=True)
class OverlayResult:
    """What :func:`draw_overlay` wrote: ``masks_drawn`` of the image's ``masks_total`` rows."""

    path: Path
    image_id: int
    image_path: str
    masks_drawn: int
    masks_total: int


def draw_overlay(
    shard_dir: str | Path,
    image_id: int,
    out_png: str | Path,
    *,
    min_score: float = 0.0,
    max_masks: int = 20,
) -> OverlayResult:
    """`uplvp inspect overlay DIR --image-id ID --out x.png`: draw image ``image_id``'s pseudo
    masks with score >= ``min_score`` (at most ``max_masks``, best first) on the image, resized
    to its proposed height x width, and write the PNG atomically.

    Raises :class:`InputError` for an unknown image id, an image that propose recorded as an
    error (with its recorded error), an image file that cannot be read now, or bad options.
    """
    shard_dir = Path(shard_dir)
    if not 0.0 <= min_score <= 1.0:
        raise InputError(f"--min-score must be in [0, 1], got {min_score}")
    if max_masks < 1:
        raise InputError(f"--max-masks must be >= 1, got {max_masks}")
    if not shard_dir.is_dir():
        raise InputError("proposal folder not found", shard_dir)
    image, masks_path = _find_image(shard_dir, image_id)
    if image["status"] != "ok":
        raise InputError(
            f"image id {image_id} ({image['image_path']}) could not be read by propose: "
            f"{image['error']}",
            shard_dir,
        )
    rows = read_shard_columns(masks_path, _OVERLAY_MASK_COLUMNS, [("image_id", "=", image_id)])
    rows = rows.to_pandas().sort_values("mask_index", kind="stable")
    drawn = rows[rows["score"] >= np.float32(min_score)].head(max_masks)
    height, width = int(image["height"]), int(image["width"])
    pixels = _load_image(image["image_path"], height, width)
    if len(drawn):
        rles = [{"size": [height, width], "counts": c} for c in drawn["rle_counts"]]
        masks = np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)
    else:
        masks = np.zeros((0, height, width), dtype=bool)
    captions = [f"{label} {score:.2f}" for label, score in zip(drawn["label"], drawn["score"])]
    boxes = np.asarray(drawn["bbox"].tolist(), dtype=np.float32).reshape(-1, 4)
    canvas = render_overlay(pixels, masks, boxes, captions)
    ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError("OpenCV could not encode the overlay as PNG", out_png)
    write_bytes_atomic(out_png, png.tobytes())
    return OverlayResult(Path(out_png), int(image_id), image["image_path"], len(drawn), len(rows))


def _find_image(shard_dir: Path, image_id: int) -> tuple[dict[str, Any], Path]:
    """The images row of ``image_id`` and the masks file of its shard."""
    for shard in find_shards(shard_dir):
        found = read_shard_columns(shard.images, _OVERLAY_IMAGE_COLUMNS, [("image_id", "=", image_id)])
        if found.num_rows:
            return found.to_pylist()[0], shard.masks
    raise InputError(f"image id {image_id} is not in the proposal shards", shard_dir)


def _load_image(path: str, height: int, width: int) -> np.ndarray:
    """The image as (height, width, 3) uint8 RGB (area-resized if the file's size differs)."""
    try:
        pixels = read_image_rgb(path)
    except ImageReadError as err:
        raise InputError(f"cannot read the image now: {err}", path) from None
    if pixels.shape[:2] != (height, width):
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    return pixels
