"""The proposer interface shared by the ``clip``, ``freemask``, ``maskcut`` and ``classical``
proposers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np


@dataclass
class ProposedMask:
    """One pseudo instance mask of one image.

    mask: bool ``[H, W]`` at the input image's resolution.
    score: confidence in [0, 1].
    label: best vocabulary entry; label_index: its index in the proposer's ``vocabulary``.
    embedding: float32 ``[E]``, L2-normalised (what it holds depends on the proposer, see
    docs/proposers.md).
    """

    mask: np.ndarray
    score: float
    label: str
    label_index: int
    embedding: np.ndarray


@runtime_checkable
class Proposer(Protocol):
    """Turns RGB images into scored instance masks.

    ``propose`` takes a batch of uint8 ``[H, W, 3]`` RGB images (sizes may differ) and returns,
    per image, its masks sorted by score descending; the same input always gives the same
    output. ``config()`` returns every setting that changes the output (JSON-serialisable), for
    the stage's config hash.
    """

    name: str
    embedding_dim: int
    vocabulary: list[str]

    def propose(self, images: list[np.ndarray]) -> list[list[ProposedMask]]: ...

    def config(self) -> dict[str, Any]: ...


def check_rgb_image(image: np.ndarray, index: int) -> None:
    """Raise ``ValueError`` unless ``image`` is a uint8 ``[H, W, 3]`` array (``index``: its
    position in the batch, for the message)."""
    is_rgb = isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
    if not is_rgb or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image {index} must be uint8 [H, W, 3] RGB, got {dtype} {shape}")


@dataclass(frozen=True)
class Letterbox:
    """Where one image sits in a square model-input canvas: resized (aspect ratio kept) to
    ``scaled_height x scaled_width`` and placed at the canvas's top-left corner."""

    height: int
    width: int
    scaled_height: int
    scaled_width: int


def letterbox_batch(
    images: list[np.ndarray], size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, list[Letterbox]]:
    """Model input for a batch of RGB uint8 ``[H, W, 3]`` images of any sizes.

    Each image is resized so its longer side is ``size`` (``cv2.INTER_AREA`` when shrinking,
    ``cv2.INTER_CUBIC`` when enlarging), scaled to [0, 1], normalised with per-channel
    ``mean``/``std`` and pasted at the top-left of a ``size x size`` canvas whose other pixels
    are 0 (the mean colour). Returns float32 ``[B, 3, size, size]`` and one :class:`Letterbox`
    per image.
    """
    canvas = np.zeros((len(images), 3, size, size), dtype=np.float32)
    boxes = []
    mean_arr = np.asarray(mean, dtype=np.float32)
    std_arr = np.asarray(std, dtype=np.float32)
    for index, image in enumerate(images):
        check_rgb_image(image, index)
        height, width = image.shape[:2]
        scale = size / max(height, width)
        sh, sw = max(1, round(height * scale)), max(1, round(width * scale))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        resized = cv2.resize(image, (sw, sh), interpolation=interpolation)
        normalised = (resized.astype(np.float32) / 255.0 - mean_arr) / std_arr
        canvas[index, :, :sh, :sw] = normalised.transpose(2, 0, 1)
        boxes.append(Letterbox(height, width, sh, sw))
    return canvas, boxes


def mask_to_canvas(mask: np.ndarray, box: Letterbox, canvas_hw: tuple[int, int]) -> np.ndarray:
    """A bool ``[H, W]`` image mask as float32 coverage ``[canvas_h, canvas_w]`` in canvas
    space (``cv2.INTER_AREA`` resize to the letterboxed size, zeros elsewhere)."""
    out = np.zeros(canvas_hw, dtype=np.float32)
    resized = cv2.resize(
        mask.astype(np.float32), (box.scaled_width, box.scaled_height), interpolation=cv2.INTER_AREA
    )
    out[: box.scaled_height, : box.scaled_width] = resized
    return out
