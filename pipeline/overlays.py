"""Masks drawn on an image: the one renderer of ``uplvp inspect overlay`` (pseudo masks) and
``uplvp predict --overlays`` (detections)."""
from __future__ import annotations

import cv2
import numpy as np

from pipeline.coco import rle_to_mask


def render_overlay(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    captions: list[str],
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw masks on an image; returns a new (H, W, 3) uint8 RGB array.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (N, H, W) bool, best first; mask i gets colour ``palette(N)[i]``.
        boxes: (N, 4) float ``x, y, w, h`` in pixels, ``w = x_max - x_min + 1`` (shard bbox).
        captions: N strings drawn at each box's top-left corner (OpenCV's Hershey font:
            ASCII only).
        alpha: weight of the mask colour in the fill.

    Each mask is filled (``(1 - alpha) * pixel + alpha * colour``), then its outer contour and
    its box are drawn in its colour (1 px) and its caption in white on its colour. Masks are
    drawn worst first so the best is on top.
    """
    n = len(masks)
    if masks.shape[1:] != image.shape[:2] or len(boxes) != n or len(captions) != n:
        raise ValueError(f"render_overlay: image {image.shape}, masks {masks.shape}, "
                         f"{len(boxes)} boxes and {len(captions)} captions do not match")
    colours = palette(n)
    canvas = image.astype(np.float32)
    for i in reversed(range(n)):
        canvas[masks[i]] = (1 - alpha) * canvas[masks[i]] + alpha * colours[i]
    canvas = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    scale = float(np.clip(min(image.shape[:2]) / 800, 0.3, 1.0))
    for i in reversed(range(n)):
        colour = tuple(int(c) for c in colours[i])
        contours, _ = cv2.findContours(
            masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(canvas, contours, -1, colour, 1)
        x, y, w, h = (int(round(v)) for v in boxes[i])
        cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), colour, 1)
        _put_caption(canvas, captions[i], x, y, colour, scale)
    return canvas


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB colours, distinct hues spaced by the golden ratio (deterministic)."""
    if n == 0:
        return np.zeros((0, 3), np.uint8)
    hues = (np.arange(n) * 0.6180339887 % 1.0 * 180).astype(np.uint8)
    hsv = np.stack([hues, np.full(n, 210, np.uint8), np.full(n, 255, np.uint8)], axis=-1)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def _put_caption(
    canvas: np.ndarray, text: str, x: int, y: int, colour: tuple[int, ...], scale: float
) -> None:
    """``text`` in white on a ``colour`` background, above the box at (x, y) if it fits,
    else just inside its top edge."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, scale, 1)
    top = y - th - base - 1 if y - th - base - 1 >= 0 else y
    cv2.rectangle(canvas, (x, top), (x + tw + 1, top + th + base), colour, cv2.FILLED)
    cv2.putText(canvas, text, (x + 1, top + th), font, scale, (255, 255, 255), 1, cv2.LINE_AA)


def render_results(image: np.ndarray, results: list[dict], alpha: float = 0.5) -> np.ndarray:
    """COCO results dicts of one image (RLE masks of the image's size, ``bbox``, ``score``,
    ``category_id``; best first) drawn by :func:`render_overlay`, captioned ``category_id
    score``."""
    height, width = image.shape[:2]
    masks = np.zeros((len(results), height, width), dtype=bool)
    for i, res in enumerate(results):
        mask = rle_to_mask(res["segmentation"])
        if mask.shape != (height, width):
            raise ValueError(f"mask size {mask.shape} != image size {(height, width)}")
        masks[i] = mask
    boxes = np.asarray([res["bbox"] for res in results], dtype=np.float32).reshape(-1, 4)
    captions = [f"{res['category_id']} {res['score']:.2f}" for res in results]
    return render_overlay(image, masks, boxes, captions, alpha)
