"""The ``maskcut`` proposer: normalized cuts on a backbone's patch affinities (CutLER's MaskCut).

Per image: features ``[C, h, w]`` of one backbone level (``uplvp_model.proposal.features``) on
the image letterboxed to ``input_size``; optionally centred (the image's mean feature
subtracted: post-ReLU features are all positive, so raw cosines are all alike), L2-normalised
per location. Affinity ``W[i, j] = 1`` where the cosine similarity of locations i and j exceeds
``tau``, else ``1e-5`` (MaskCut's binarised graph). Then ``num_cuts`` times:

1. the second smallest generalised eigenvector ``v`` of ``(D - W) v = lambda D v`` (Shi and
   Malik's normalized cut; ``D`` the degrees) over the locations not yet taken;
2. bipartition ``v > mean(v)``; the foreground is the side holding ``argmax |v|`` (the seed),
   flipped when it holds two or more of the grid's four corners (a background, as MaskCut);
3. the 8-connected component of the foreground that holds the seed is the mask;
4. its locations leave the graph (their affinities set to ``1e-5``) for the next cut.

Score of a mask: ``1 - Ncut / 2`` of its cut in the graph it was cut from (``Ncut =
cut/assoc(A) + cut/assoc(B)`` in [0, 2]; a segment that barely connects to the rest scores near
1). Masks scoring under ``min_score``, smaller than ``min_area`` pixels (at the image's size) or
larger than ``max_area_fraction`` of the image are dropped, mask NMS (IoU > ``nms_iou``) keeps
the first of near-duplicates, at most ``top_k`` (None: no cap) remain. Patch masks reach the
image through bilinear upsampling of the 0/1 patch grid and a 0.5 threshold. With ``crop_grid``
g > 1 the same runs on each of a g x g grid of half-overlapping crops too (``crop_views``) and
their masks are pasted back before the filters and NMS. Label ``"object"``; embedding: the normalised features averaged over
the mask (as ``freemask``).
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

from .base import Letterbox, ProposedMask, letterbox_batch, mask_to_canvas
from .registry import PROPOSERS
from .features import load_feature_backbone
from .freemask import IMAGENET_MEAN, IMAGENET_STD
from .ingredients import mask_pooled_embedding
from .masks import mask_nms

EPSILON = 1e-5  # MaskCut's weight of an edge below tau


def normalized_cut(weights: np.ndarray) -> np.ndarray:
    """The second smallest generalised eigenvector ``v`` of ``(D - W) v = lambda D v``.

    weights: symmetric float64 ``[N, N]`` with positive row sums. Solved as the second largest
    eigenvector ``u`` of ``D^-1/2 W D^-1/2`` (``v = D^-1/2 u``) with ARPACK (Lanczos, from a
    fixed start vector, so the result repeats), dense LAPACK for small graphs. Returns float64
    ``[N]`` (sign as the solver returns it)."""
    degree = weights.sum(axis=1)
    scale = 1.0 / np.sqrt(degree)
    normalised = weights * scale[:, None] * scale[None, :]
    if len(weights) <= 64:
        _, vectors = scipy.linalg.eigh(normalised, subset_by_index=[len(weights) - 2,
                                                                     len(weights) - 2])
    else:
        start = np.sqrt(degree) + np.linspace(0.0, 1.0, len(degree))  # fixed, not an eigenvector
        values, vectors = scipy.sparse.linalg.eigsh(normalised, k=2, which="LA", v0=start)
        vectors = vectors[:, np.argsort(values)[:1]]
    return vectors[:, 0] * scale


def ncut_value(weights: np.ndarray, part: np.ndarray) -> float:
    """``cut(A, B) / assoc(A, V) + cut(A, B) / assoc(B, V)`` of the bipartition ``part`` (bool
    ``[N]``: A) of the graph ``weights``; 2.0 when a side is empty."""
    rest = ~part
    if not part.any() or not rest.any():
        return 2.0
    cut = weights[np.ix_(part, rest)].sum()
    return float(cut / weights[part].sum() + cut / weights[rest].sum())


def seed_component(part: np.ndarray, seed: int, shape: tuple[int, int]) -> np.ndarray:
    """bool ``[h * w]``: the 8-connected component of ``part`` (bool ``[h * w]``) holding
    location ``seed`` (empty if the seed is not in ``part``)."""
    grid = part.reshape(shape).astype(np.uint8)
    _, labels = cv2.connectedComponents(grid, connectivity=8)
    label = labels.reshape(-1)[seed]
    if label == 0:
        return np.zeros_like(part)
    return labels.reshape(-1) == label


def corner_count(part: np.ndarray, shape: tuple[int, int]) -> int:
    grid = part.reshape(shape)
    return int(grid[0, 0]) + int(grid[0, -1]) + int(grid[-1, 0]) + int(grid[-1, -1])


def maskcut(features: np.ndarray, tau: float, num_cuts: int, center: bool = True
            ) -> list[tuple[np.ndarray, float]]:
    """MaskCut on one feature map (float ``[C, h, w]``) -> up to ``num_cuts`` (bool ``[h, w]``
    patch mask, score) pairs, in cut order (see module docstring)."""
    channels, height, width = features.shape
    flat = features.reshape(channels, -1).astype(np.float64)
    if center:
        flat = flat - flat.mean(axis=1, keepdims=True)
    flat /= np.maximum(np.linalg.norm(flat, axis=0, keepdims=True), 1e-12)
    affinity = np.where(flat.T @ flat > tau, 1.0, EPSILON)
    taken = np.zeros(height * width, dtype=bool)
    results = []
    for _ in range(num_cuts):
        if taken.all():
            break
        weights = affinity.copy()
        weights[taken] = EPSILON
        weights[:, taken] = EPSILON
        vector = normalized_cut(weights)
        seed = int(np.argmax(np.abs(vector)))
        part = vector > vector.mean()
        if not part[seed]:
            part = ~part
        if corner_count(part, (height, width)) >= 2:  # the background side: take the other
            part = ~part
            seed = int(np.argmax(np.where(part, np.abs(vector), -1.0)))
        part &= ~taken
        mask = seed_component(part, seed, (height, width))
        if not mask.any():
            break
        results.append((mask.reshape(height, width), 1.0 - ncut_value(weights, part) / 2.0))
        taken |= mask
    return results


@PROPOSERS.register("maskcut")
class MaskCutProposer:
    """The ``maskcut`` proposer (see module docstring)."""

    name = "maskcut"

    def __init__(
        self,
        *,
        backbone: str | None = None,
        checkpoint: str | None = None,
        device: str = "cpu",
        feature_level: str = "layer3",
        input_size: int = 512,
        tau: float = 0.2,
        center: bool = True,
        num_cuts: int = 3,
        nms_iou: float = 0.5,
        top_k: int | None = 20,
        min_area: int = 32,
        max_area_fraction: float = 1.0,
        min_score: float = 0.0,
        crop_grid: int = 1,
        random_weights: bool = False,
    ) -> None:
        if checkpoint is None and not random_weights:
            raise ValueError(
                "no backbone checkpoint given: random weights give meaningless masks; pass a "
                "checkpoint, or random_weights=True for a speed or test run"
            )
        if num_cuts < 1:
            raise ValueError(f"num_cuts must be >= 1, got {num_cuts}")
        if crop_grid < 1:
            raise ValueError(f"crop_grid must be >= 1, got {crop_grid}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (no cap), got {top_k}")
        features = load_feature_backbone(backbone, checkpoint, feature_level, device)
        self.backbone = features.body
        self.device = torch.device(device)
        self.stride = features.stride
        self.embedding_dim = features.channels
        self.vocabulary = ["object"]
        self._settings = {
            "backbone": features.name, "checkpoint": checkpoint,
            "pretrained": checkpoint is not None, "feature_level": feature_level,
            "input_size": input_size, "tau": tau, "center": center, "num_cuts": num_cuts,
            "nms_iou": nms_iou, "top_k": top_k, "min_area": min_area,
            "max_area_fraction": max_area_fraction, "min_score": min_score,
            "crop_grid": crop_grid,
        }

    def config(self) -> dict[str, Any]:
        """Every setting that changes the output (JSON-serialisable)."""
        return {"proposer": self.name, **self._settings}

    @torch.inference_mode()
    def propose(self, images: list[np.ndarray]) -> list[list[ProposedMask]]:
        """Masks per image (uint8 ``[H, W, 3]`` RGB in), sorted by score descending."""
        if not images:
            return []
        size = self._settings["input_size"]
        if self._settings["crop_grid"] == 1:  # one view per image: batch the images
            canvas, boxes = letterbox_batch(images, size, IMAGENET_MEAN, IMAGENET_STD)
            features = self.backbone(torch.from_numpy(canvas).to(self.device)).float().cpu()
            return [self._select([(cut, (0, 0)) for cut in self._view_cuts(features[i], box)],
                                 features[i], box) for i, box in enumerate(boxes)]
        results = []
        for image in images:  # the whole image and its crops, one batch per image
            views = crop_views(image, self._settings["crop_grid"])
            canvas, boxes = letterbox_batch([v for v, _ in views], size, IMAGENET_MEAN,
                                            IMAGENET_STD)
            features = self.backbone(torch.from_numpy(canvas).to(self.device)).float().cpu()
            cuts = [(cut, offset) for (_, offset), f, box in zip(views, features, boxes)
                    for cut in self._view_cuts(f, box)]
            results.append(self._select(cuts, features[0], boxes[0]))
        return results

    def _view_cuts(self, features: torch.Tensor, box: Letterbox) -> list[tuple[np.ndarray, float]]:
        """MaskCut on one letterboxed view: (bool mask at the view's size, score) pairs."""
        s = self._settings
        valid_h = math.ceil(box.scaled_height / self.stride)
        valid_w = math.ceil(box.scaled_width / self.stride)
        features = features[:, :valid_h, :valid_w]
        if valid_h * valid_w < 4:
            return []
        cuts = maskcut(features.numpy(), s["tau"], s["num_cuts"], s["center"])
        cuts = [(m, score) for m, score in cuts if score >= s["min_score"]]
        if not cuts:
            return []
        canvas_hw = (valid_h * self.stride, valid_w * self.stride)
        patch = torch.from_numpy(np.stack([m for m, _ in cuts]).astype(np.float32))
        upsampled = F.interpolate(patch[None], size=canvas_hw, mode="bilinear",
                                  align_corners=False)[:, :, : box.scaled_height, : box.scaled_width]
        upsampled = F.interpolate(upsampled, size=(box.height, box.width), mode="bilinear",
                                  align_corners=False)[0]
        return [(mask, score) for mask, (_, score) in zip((upsampled > 0.5).numpy(), cuts)]

    def _select(self, cuts: list[tuple[tuple[np.ndarray, float], tuple[int, int]]],
                features: torch.Tensor, box: Letterbox) -> list[ProposedMask]:
        """The image's masks from the cuts of its views (pasted at their offsets): area
        filters, NMS, cap; embeddings pooled from the whole image's features."""
        s = self._settings
        height, width = box.height, box.width
        max_area = s["max_area_fraction"] * height * width
        masks, scores = [], []
        for (view_mask, score), (y0, x0) in cuts:
            mask = np.zeros((height, width), dtype=bool)
            mask[y0:y0 + view_mask.shape[0], x0:x0 + view_mask.shape[1]] = view_mask
            if s["min_area"] <= mask.sum() <= max_area:
                masks.append(mask)
                scores.append(score)
        if not masks:
            return []
        masks, scores = np.stack(masks), np.asarray(scores)
        kept = mask_nms(masks, scores, s["nms_iou"], max_keep=s["top_k"])
        valid_h = math.ceil(box.scaled_height / self.stride)
        valid_w = math.ceil(box.scaled_width / self.stride)
        canvas_hw = (valid_h * self.stride, valid_w * self.stride)
        dense = F.normalize(features[:, :valid_h, :valid_w], dim=0).numpy()
        return [
            ProposedMask(mask=masks[i], score=float(scores[i]), label="object", label_index=0,
                         embedding=mask_pooled_embedding(dense, mask_to_canvas(masks[i], box,
                                                                               canvas_hw)))
            for i in kept
        ]


def crop_views(image: np.ndarray, grid: int) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """The whole image and, for ``grid`` g > 1, a g x g grid of overlapping crops, each
    ``2 / (g + 1)`` of the image's height and width, at steps of ``1 / (g + 1)`` (half-overlap):
    ``[(view, (y0, x0)), ...]``, the whole image first."""
    height, width = image.shape[:2]
    views = [(image, (0, 0))]
    if grid > 1:
        crop_h, crop_w = 2 * height // (grid + 1), 2 * width // (grid + 1)
        for i in range(grid):
            for j in range(grid):
                y0, x0 = i * height // (grid + 1), j * width // (grid + 1)
                views.append((image[y0:y0 + crop_h, x0:x0 + crop_w], (y0, x0)))
    return views
