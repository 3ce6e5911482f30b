"""Reading images robustly: one RGB uint8 array or one clear error, never a crash.

``cv2.imdecode`` over the file's bytes handles paths with spaces/unicode, applies EXIF rotation,
and turns grayscale, RGBA and 16-bit images into 8-bit 3-channel images. Images larger than
``max_side`` are downscaled (area interpolation) so a huge file cannot exhaust memory downstream.
Peak memory is one decoded full-size image; OpenCV refuses headers declaring more than
``CV_IO_MAX_IMAGE_PIXELS`` (2**30 by default) pixels, which becomes an ``ImageReadError``.
"""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np


class ImageReadError(Exception):
    """An image that cannot be decoded; ``str(err)`` is a short reason (no path)."""


def read_image_rgb(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Decode ``path`` to an (H, W, 3) uint8 RGB array, downscaled to ``max_side`` if larger."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise ImageReadError(f"cannot read file ({err.strerror or err})") from None
    if data.size == 0:
        raise ImageReadError("empty file (0 bytes)")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as err:  # e.g. a header declaring more than CV_IO_MAX_IMAGE_PIXELS pixels
        raise ImageReadError(f"decoder refused the image ({_cv_reason(err)})") from None
    if image is None:
        raise ImageReadError("not a decodable image (corrupt, truncated or unsupported format)")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if max_side is not None and max(image.shape[:2]) > max_side:
        image = resize_max_side(image, max_side)
    return np.ascontiguousarray(image)


def _cv_reason(err: cv2.error) -> str:
    """The short reason of an OpenCV error: ``pixels <= CV_IO_MAX_IMAGE_PIXELS`` style."""
    text = str(err).split("error: ", 1)[-1].split(" in function")[0]
    return re.sub(r"^\(-?\d+:[^)]*\)\s*", "", text.strip()) or "OpenCV error"


def resize_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so that the longer side equals ``max_side`` (aspect ratio kept, >= 1 px)."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
