"""Per-mask prompt ingredients: tight box, shape grid, packed bits, mask-pooled embedding.

Pure numpy/OpenCV functions. Masks are ``bool [H, W]`` (row = y, column = x); boxes are
``(x, y, w, h)`` in pixels with ``(x, y)`` the top-left pixel and ``w``/``h`` counted in whole
pixels (a single pixel at column 3, row 5 has box ``(3.0, 5.0, 1.0, 1.0)``).
"""
from __future__ import annotations

import cv2
import numpy as np


def mask_box_xywh(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box of a non-empty bool mask ``[H, W]``: ``(x_min, y_min, x_max - x_min + 1,
    y_max - y_min + 1)`` as floats (pixels)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("mask is empty: it has no box")
    x0, y0 = int(xs.min()), int(ys.min())
    return float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)


def shape_grid(mask: np.ndarray, grid: int = 32) -> np.ndarray:
    """Shape of a mask inside its own box, as a bool ``[grid, grid]`` image.

    The mask is cropped to its tight box (aspect ratio not kept: the box is stretched to a
    square) and resized with ``cv2.INTER_AREA``; a cell is on when the resized value (the
    fraction of the cell covered by the mask when shrinking) is ``>= 0.5``.
    """
    x, y, w, h = (int(v) for v in mask_box_xywh(mask))
    crop = mask[y : y + h, x : x + w].astype(np.float32)
    resized = cv2.resize(crop, (grid, grid), interpolation=cv2.INTER_AREA)
    return resized >= 0.5


def pack_bits(grid: np.ndarray) -> bytes:
    """A bool ``[G, G]`` grid as bytes, row-major, 8 cells per byte, first cell in the highest
    bit (``np.packbits``); ``ceil(G * G / 8)`` bytes."""
    if grid.ndim != 2 or grid.shape[0] != grid.shape[1]:
        raise ValueError(f"shape grid must be square [G, G], got shape {grid.shape}")
    return np.packbits(grid.astype(bool).reshape(-1)).tobytes()


def unpack_bits(data: bytes, grid: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: bytes -> bool ``[grid, grid]``."""
    expected = (grid * grid + 7) // 8
    if len(data) != expected:
        raise ValueError(f"shape grid of size {grid} needs {expected} bytes, got {len(data)}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=grid * grid)
    return bits.reshape(grid, grid).astype(bool)


def l2_normalise(vector: np.ndarray) -> np.ndarray:
    """``vector / ||vector||`` as float32 (a zero vector stays zero)."""
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def mask_pooled_embedding(dense: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average of a dense feature map over a mask, L2-normalised.

    dense: float ``[E, h, w]`` features covering the same image extent as ``mask`` (bool
    ``[H, W]`` or float coverage in [0, 1], any resolution). The mask is resized to ``h x w``
    with ``cv2.INTER_AREA``, so each feature cell is weighted by the fraction of it the mask
    covers. Returns float32 ``[E]``.
    """
    if dense.ndim != 3:
        raise ValueError(f"dense features must be [E, h, w], got shape {dense.shape}")
    _, h, w = dense.shape
    weights = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    total = float(weights.sum())
    if total <= 0:
        raise ValueError("mask is empty: nothing to pool")
    pooled = np.tensordot(dense.astype(np.float32), weights, axes=([1, 2], [0, 1])) / total
    return l2_normalise(pooled)
