"""From per-class probability maps to scored instance masks (numpy + OpenCV, pure functions).

Conventions: a mask is a ``bool`` array ``[H, W]`` (row = y, column = x); a stack of masks is
``bool [N, H, W]``; scores are ``float`` arrays ``[N]``. Orderings are deterministic: ties in
score keep the order in which candidates were produced (stable sorts).
"""
from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np


class MaskCandidate(NamedTuple):
    """One instance mask found in a probability map.

    mask: bool ``[H, W]``; score: in [0, 1]; class_index: channel of the probability map.
    """

    mask: np.ndarray
    score: float
    class_index: int


def mask_iou_matrix(masks: np.ndarray) -> np.ndarray:
    """Pairwise IoU of a mask stack.

    masks: bool ``[N, H, W]``. Returns float64 ``[N, N]``; IoU of two empty masks is 0.
    Pixel counts are accumulated in float32 (exact) when ``H * W < 2**24``, else float64.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    pixels = masks.shape[1] * masks.shape[2]
    flat = masks.reshape(masks.shape[0], pixels).astype(np.float32 if pixels < 2**24 else np.float64)
    inter = (flat @ flat.T).astype(np.float64)
    areas = flat.sum(axis=1, dtype=np.float64)
    union = areas[:, None] + areas[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_nms(
    masks: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None
) -> np.ndarray:
    """Greedy hard NMS on masks.

    masks: bool ``[N, H, W]``; scores: ``[N]``. Masks are visited by score, descending (ties:
    lower index first); one is dropped when its IoU with an already kept mask is strictly
    greater than ``iou_threshold``. Stops after ``max_keep`` kept masks (all when ``None``).
    Returns the kept indices, int64 ``[M]``, in visiting order. Each visited mask is compared
    with the kept ones on its own pixels only, so the cost grows with N x kept x mask area, not
    N^2 x H x W.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    limit = len(order) if max_keep is None else min(max_keep, len(order))
    flat = masks.reshape(len(masks), int(np.prod(masks.shape[1:])))
    areas = flat.sum(axis=1)
    kept_rows = np.zeros((limit, flat.shape[1]), dtype=bool)
    kept: list[int] = []
    for i in order:
        if len(kept) == limit:
            break
        if kept:
            inter = kept_rows[: len(kept), flat[i]].sum(axis=1)
            union = areas[kept] + areas[i] - inter
            iou = np.divide(inter, union, out=np.zeros(len(kept)), where=union > 0)
            if (iou > iou_threshold).any():
                continue
        kept_rows[len(kept)] = flat[i]
        kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def matrix_nms(masks: np.ndarray, scores: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Class-agnostic Gaussian Matrix NMS (SOLOv2), as used by FreeSOLO (sigma 2).

    Each mask's score decays by ``min_i exp(-sigma * iou(i, j)^2) / exp(-sigma * c_i^2)`` over
    the higher-scored masks ``i``, where ``c_i`` is the largest IoU of mask ``i`` with any mask
    scored above it. masks: bool ``[N, H, W]``; scores: ``[N]``. Returns the decayed scores,
    float64 ``[N]``, in the input order (never larger than the input scores).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(scores)} scores")
    if len(scores) == 0:
        return scores.copy()
    order = np.argsort(-scores, kind="stable")
    iou = np.triu(mask_iou_matrix(masks[order]), k=1)  # [i, j]: i scored above j
    compensate = iou.max(axis=0)  # per mask: largest IoU with a higher-scored mask
    decay = np.exp(-sigma * iou**2) / np.exp(-sigma * compensate[:, None] ** 2)
    decayed_sorted = scores[order] * decay.min(axis=0)
    decayed = np.empty_like(decayed_sorted)
    decayed[order] = decayed_sorted
    return decayed


def masks_from_probability_maps(
    prob: np.ndarray,
    *,
    threshold: float,
    min_peak: float,
    min_area: int = 32,
    max_area_fraction: float = 0.95,
    nms_iou: float = 0.5,
    top_k: int = 20,
) -> list[MaskCandidate]:
    """Instance masks from per-class probability maps.

    prob: float ``[C, H, W]``, values in [0, 1] (e.g. a softmax over classes per pixel).
    For each class whose map reaches ``min_peak``: pixels with ``prob >= threshold`` are split
    into 8-connected components; a component whose own peak is below ``min_peak``, whose area is
    below ``min_area`` pixels or above ``max_area_fraction * H * W`` is dropped (area filters run
    before NMS so a discarded mask never suppresses a kept one).
    score = mean probability inside the component x maskness, where maskness is the mean of the
    class map min-max normalised over the whole image (``(p - min) / (max - min)``) inside the
    component. Candidates then go through hard mask NMS (IoU > ``nms_iou`` suppressed, across
    classes) and the best ``top_k`` are returned, sorted by score descending (ties: class index,
    then OpenCV component order).
    """
    if prob.ndim != 3:
        raise ValueError(f"prob must be [C, H, W], got shape {prob.shape}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    _, height, width = prob.shape
    max_area = max_area_fraction * height * width
    masks: list[np.ndarray] = []
    scores: list[float] = []
    classes: list[int] = []
    for class_index, class_map in enumerate(prob):
        class_map = class_map.astype(np.float64, copy=False)
        peak, low = float(class_map.max()), float(class_map.min())
        if peak < min_peak:
            continue
        normalised = (class_map - low) / (peak - low) if peak > low else np.ones_like(class_map)
        binary = (class_map >= threshold).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        for component in range(1, count):
            area = int(stats[component, cv2.CC_STAT_AREA])
            if area < min_area or area > max_area:
                continue
            mask = labels == component
            inside = class_map[mask]
            if inside.max() < min_peak:
                continue
            masks.append(mask)
            scores.append(float(inside.mean() * normalised[mask].mean()))
            classes.append(class_index)
    if not masks:
        return []
    stack = np.stack(masks)
    kept = mask_nms(stack, np.asarray(scores), nms_iou, max_keep=top_k)
    return [MaskCandidate(stack[i], scores[i], classes[i]) for i in kept]
