"""Training / evaluation transforms of one sample: pure numpy + OpenCV functions, seeded.

A :class:`Sample` holds one image and its instances in pixel space (row = y, column = x):
the image as uint8 ``[H, W, 3]`` RGB, masks as bool ``[M, H, W]``, and, for pre-training, the
prompt ingredients of each mask (shape grid, CLIP embedding) in the same order. Every transform
returns a new sample and keeps the M-indexed arrays aligned; :func:`drop_empty_masks` removes a
mask that vanished (e.g. when shrinking) together with its label and prompt ingredients.

Conventions:
- resize keeps the aspect ratio: ``scale = min(short / min(h, w), max_long / max(h, w))``,
  new side ``int(side * scale + 0.5)`` (at least 1); the image is resized bilinearly, masks with
  ``cv2.INTER_NEAREST_EXACT`` (pixel-centre sampling);
- a horizontal flip mirrors the image, the masks and the shape grids (a grid is the mask inside
  its own box, so mirroring the mask mirrors its grid);
- boxes are never carried: :func:`mask_boxes_xyxy` recomputes them from the final masks;
- normalisation: ``(image / 255 - PIXEL_MEAN) / PIXEL_STD`` (``uplvp_model.backbone``), as
  float32 ``[3, H, W]``; batches are then zero-padded to a multiple of 32 (:func:`padded_size`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import cv2
import numpy as np

from uplvp_model.backbone import PIXEL_MEAN, PIXEL_STD

PAD_MULTIPLE = 32


@dataclass(frozen=True)
class Sample:
    """One image and its instances.

    image: uint8 ``[H, W, 3]`` RGB. masks: bool ``[M, H, W]``. labels: int64 ``[M]``.
    orig_size: ``(H0, W0)`` of the image as indexed by its dataset (before any transform).
    shape_grids: bool ``[M, G, G]`` or None. embeddings: float32 ``[M, E]`` or None.
    label_index: int64 ``[M]`` (the proposer's vocabulary index of each pseudo mask) or None.
    """

    image_id: int
    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    orig_size: tuple[int, int]
    shape_grids: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    label_index: np.ndarray | None = None

    def select(self, keep: np.ndarray) -> "Sample":
        """The sample with only the instances where ``keep`` (bool ``[M]`` or indices) holds."""
        return replace(
            self,
            masks=self.masks[keep],
            labels=self.labels[keep],
            shape_grids=None if self.shape_grids is None else self.shape_grids[keep],
            embeddings=None if self.embeddings is None else self.embeddings[keep],
            label_index=None if self.label_index is None else self.label_index[keep],
        )


@dataclass(frozen=True)
class AugmentConfig:
    """Resize and flip settings.

    short_side: ``(lo, hi)``; the target short side is drawn uniformly from the integers
    ``lo..hi`` (scale jitter); ``(s, s)`` is a fixed resize. max_long_side: the long side never
    exceeds it. flip_prob: probability of a horizontal flip (0 for evaluation).
    """

    short_side: tuple[int, int] = (640, 800)
    max_long_side: int = 1333
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = self.short_side
        if not 1 <= lo <= hi:
            raise ValueError(
                f"short_side must be (lo, hi) with 1 <= lo <= hi, got {self.short_side}"
            )
        if self.max_long_side < 1:
            raise ValueError(f"max_long_side must be positive, got {self.max_long_side}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")


def eval_config(short_side: int = 800, max_long_side: int = 1333) -> AugmentConfig:
    """A deterministic resize (no jitter, no flip) for evaluation."""
    return AugmentConfig((short_side, short_side), max_long_side, 0.0)


def resized_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the short side ``short_side`` unless the long side would exceed
    ``max_long_side`` (then the long side is ``max_long_side``); aspect ratio kept."""
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize(sample: Sample, size: tuple[int, int]) -> Sample:
    """Resize image (bilinear) and masks (nearest, pixel centres) to ``size = (h, w)``."""
    h, w = size
    if sample.image.shape[:2] == (h, w):
        return sample
    image = cv2.resize(sample.image, (w, h), interpolation=cv2.INTER_LINEAR)
    masks = np.zeros((sample.masks.shape[0], h, w), dtype=bool)
    for i, mask in enumerate(sample.masks):
        resized = cv2.resize(mask.view(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
        masks[i] = resized > 0
    return replace(sample, image=image, masks=masks)


def hflip(sample: Sample) -> Sample:
    """Mirror image, masks and shape grids left-right."""
    return replace(
        sample,
        image=np.ascontiguousarray(sample.image[:, ::-1]),
        masks=np.ascontiguousarray(sample.masks[:, :, ::-1]),
        shape_grids=None
        if sample.shape_grids is None
        else np.ascontiguousarray(sample.shape_grids[:, :, ::-1]),
    )


def drop_empty_masks(sample: Sample) -> Sample:
    """Remove masks with no pixel left, with their labels, shape grids and embeddings."""
    keep = sample.masks.any(axis=(1, 2))
    return sample if bool(keep.all()) else sample.select(keep)


def augment(sample: Sample, config: AugmentConfig, rng: np.random.Generator) -> Sample:
    """Scale-jitter resize, random horizontal flip, then drop vanished masks.

    Draws exactly two values from ``rng`` (the short side, then the flip coin) whatever the
    config, so a sample's randomness depends only on how ``rng`` was seeded.
    """
    lo, hi = config.short_side
    short_side = int(rng.integers(lo, hi + 1))
    flip = bool(rng.random() < config.flip_prob)
    h, w = sample.image.shape[:2]
    out = resize(sample, resized_size(h, w, short_side, config.max_long_side))
    if flip:
        out = hflip(out)
    return drop_empty_masks(out)


def mask_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of bool masks ``[M, H, W]`` -> float32 ``[M, 4]`` ``(x0, y0, x1, y1)`` in
    pixels with exclusive ``x1``/``y1`` (a single pixel at column 3, row 5 is ``(3, 5, 4, 6)``),
    so the box covers exactly the mask's pixel extent. Empty masks give ``(0, 0, 0, 0)``."""
    m = masks.shape[0]
    boxes = np.zeros((m, 4), dtype=np.float32)
    if m == 0:
        return boxes
    cols = masks.any(axis=1)  # [M, W]
    rows = masks.any(axis=2)  # [M, H]
    nonempty = cols.any(axis=1)
    w, h = cols.shape[1], rows.shape[1]
    boxes[:, 0] = cols.argmax(axis=1)
    boxes[:, 1] = rows.argmax(axis=1)
    boxes[:, 2] = w - cols[:, ::-1].argmax(axis=1)
    boxes[:, 3] = h - rows[:, ::-1].argmax(axis=1)
    boxes[~nonempty] = 0.0
    return boxes


def normalize_image(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB -> float32 ``[3, H, W]``: ``(image / 255 - mean) / std``."""
    mean = np.asarray(PIXEL_MEAN, dtype=np.float32)
    std = np.asarray(PIXEL_STD, dtype=np.float32)
    out = (image.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def padded_size(sizes: Sequence[tuple[int, int]], multiple: int = PAD_MULTIPLE) -> tuple[int, int]:
    """Smallest ``(H, W)``, both multiples of ``multiple``, containing every ``(h, w)``."""
    if not sizes:
        raise ValueError("padded_size needs at least one size")
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    return math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
