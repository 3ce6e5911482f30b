"""The ``freemask`` proposer: FreeSOLO-style free masks over a backbone's features.

Per image (the UPLVP reference generator, re-implemented): features ``[C, h, w]`` of one
backbone level (``uplvp_model.proposal.features``: any of our backbones, the architecture read
from the checkpoint), L2-normalised per location. Queries = the feature map resized (bilinear)
by each of ``query_scales`` (1, 0.5, 0.25), every location one query. Each query's cosine
similarity with every location, min-max normalised per query, is a soft mask; ``soft >
threshold`` (0.5) its binary mask; maskness = mean soft value inside the binary mask. Masks
with maskness below ``min_maskness`` (0.7), a box at least ``max_width_fraction`` (0.95) of the
image wide, or a box centre in the top ``top_band`` (20%) of the image are dropped; the rest go
through Gaussian Matrix NMS (sigma 2) on maskness. How many masks an image gets follows the
score: those whose decayed score reaches ``min_score`` (0.5) are kept, at most ``top_k`` (20;
None: no cap) of them, upsampled to the image and thresholded again; masks under ``min_area``
(32) pixels are dropped. (The reference applies the maskness and geometry filters after NMS;
here they come first so rejected masks neither suppress kept ones nor take top-K slots.)

Label: the vocabulary is the single entry ``"object"``. Embedding: the normalised backbone
features averaged over the mask, L2-normalised (dimension = the level's channels; not CLIP).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Letterbox, ProposedMask, letterbox_batch, mask_to_canvas
from .registry import PROPOSERS
from .features import load_feature_backbone
from .ingredients import mask_pooled_embedding
from .masks import matrix_nms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_backbone(backbone: str | None, checkpoint: str | None, feature_level: str,
                  device: str | torch.device = "cpu") -> torch.nn.Module:
    """The backbone's weight module (eval mode) truncated after ``feature_level``
    (:func:`uplvp_model.proposal.features.load_feature_backbone`'s ``body``)."""
    return load_feature_backbone(backbone, checkpoint, feature_level, device).body


def query_masks(
    features: torch.Tensor, query_scales: tuple[float, ...], threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft masks of multi-scale feature queries.

    features: float ``[C, h, w]``. Returns (soft ``[Q, h, w]`` min-max normalised cosine
    similarity in [0, 1], binary ``soft > threshold`` bool ``[Q, h, w]``, maskness ``[Q]``),
    queries ordered by scale then row-major location.
    """
    keys = F.normalize(features.float(), dim=0)
    channels, height, width = keys.shape
    queries = []
    for scale in query_scales:
        if scale == 1.0:
            scaled = keys
        else:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(keys[None], size=size, mode="bilinear", align_corners=False)[0]
        queries.append(F.normalize(scaled.reshape(channels, -1), dim=0))
    similarity = torch.cat(queries, dim=1).T @ keys.reshape(channels, -1)  # [Q, h * w]
    low = similarity.amin(dim=1, keepdim=True)
    high = similarity.amax(dim=1, keepdim=True)
    soft = ((similarity - low) / (high - low).clamp_min(1e-6)).reshape(-1, height, width)
    binary = soft > threshold
    inside = binary.sum(dim=(1, 2))
    maskness = (soft * binary).sum(dim=(1, 2)) / inside.clamp_min(1)
    return soft, binary, maskness


def geometry_keep(binary: torch.Tensor, max_width_fraction: float, top_band: float) -> torch.Tensor:
    """bool ``[Q]``: masks (bool ``[Q, h, w]``) that are non-empty, narrower than
    ``max_width_fraction`` of the width, and whose box centre is below the top ``top_band``."""
    _, height, width = binary.shape
    columns = binary.any(dim=1)  # [Q, w]
    rows = binary.any(dim=2)  # [Q, h]
    nonempty = columns.any(dim=1)
    xs = torch.arange(width, device=binary.device)
    ys = torch.arange(height, device=binary.device)
    x_min = torch.where(columns, xs, width).amin(dim=1)
    x_max = torch.where(columns, xs, -1).amax(dim=1)
    y_min = torch.where(rows, ys, height).amin(dim=1)
    y_max = torch.where(rows, ys, -1).amax(dim=1)
    box_width = (x_max - x_min + 1).float()
    centre_y = (y_min + y_max + 1).float() / 2
    return nonempty & (box_width < max_width_fraction * width) & (centre_y >= top_band * height)


@PROPOSERS.register("freemask")
class FreeMaskProposer:
    """The ``freemask`` proposer (see module docstring)."""

    name = "freemask"

    def __init__(
        self,
        *,
        backbone: str | None = None,
        checkpoint: str | None = None,
        device: str = "cpu",
        feature_level: str = "layer3",
        input_size: int = 512,
        query_scales: tuple[float, ...] = (1.0, 0.5, 0.25),
        threshold: float = 0.5,
        min_maskness: float = 0.7,
        nms_sigma: float = 2.0,
        top_k: int | None = 20,
        max_width_fraction: float = 0.95,
        top_band: float = 0.2,
        min_area: int = 32,
        min_score: float = 0.5,
        random_weights: bool = False,
    ) -> None:
        if checkpoint is None and not random_weights:
            raise ValueError(
                "no backbone checkpoint given: random weights give meaningless masks; pass a "
                "checkpoint, or random_weights=True for a speed or test run"
            )
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (no cap), got {top_k}")
        features = load_feature_backbone(backbone, checkpoint, feature_level, device)
        self.backbone = features.body
        self.device = torch.device(device)
        self.stride = features.stride
        self.embedding_dim = features.channels
        self.vocabulary = ["object"]
        self._settings = {
            "backbone": features.name,
            "checkpoint": checkpoint,
            "pretrained": checkpoint is not None,
            "feature_level": feature_level,
            "input_size": input_size,
            "query_scales": [float(s) for s in query_scales],
            "threshold": threshold,
            "min_maskness": min_maskness,
            "nms_sigma": nms_sigma,
            "top_k": top_k,
            "max_width_fraction": max_width_fraction,
            "top_band": top_band,
            "min_area": min_area,
            "min_score": min_score,
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
        canvas, boxes = letterbox_batch(images, size, IMAGENET_MEAN, IMAGENET_STD)
        features = self.backbone(torch.from_numpy(canvas).to(self.device))  # [B, C, g, g]
        return [self._image_masks(features[i], box) for i, box in enumerate(boxes)]

    def _image_masks(self, features: torch.Tensor, box: Letterbox) -> list[ProposedMask]:
        s = self._settings
        valid_h = math.ceil(box.scaled_height / self.stride)
        valid_w = math.ceil(box.scaled_width / self.stride)
        features = features[:, :valid_h, :valid_w]
        soft, binary, maskness = query_masks(features, tuple(s["query_scales"]), s["threshold"])
        keep = maskness >= s["min_maskness"]
        keep &= geometry_keep(binary, s["max_width_fraction"], s["top_band"])
        candidates = torch.nonzero(keep).flatten()
        if len(candidates) == 0:
            return []
        decayed = matrix_nms(
            binary[candidates].cpu().numpy(), maskness[candidates].cpu().numpy(), s["nms_sigma"]
        )
        order = np.argsort(-decayed, kind="stable")
        order = order[decayed[order] >= s["min_score"]][: s["top_k"]]  # threshold, then cap
        if len(order) == 0:
            return []
        chosen = candidates[torch.from_numpy(order).to(candidates.device)]
        canvas_hw = (valid_h * self.stride, valid_w * self.stride)
        upsampled = F.interpolate(soft[chosen][None], size=canvas_hw, mode="bilinear")
        upsampled = upsampled[:, :, : box.scaled_height, : box.scaled_width]
        image_hw = (box.height, box.width)
        upsampled = F.interpolate(upsampled, size=image_hw, mode="bilinear")[0]
        masks = (upsampled > s["threshold"]).cpu().numpy()
        dense = F.normalize(features.float(), dim=0).cpu().numpy()
        results = []
        for mask, score in zip(masks, decayed[order]):
            if mask.sum() < s["min_area"]:
                continue
            weights = mask_to_canvas(mask, box, canvas_hw)
            results.append(
                ProposedMask(
                    mask=mask,
                    score=float(score),
                    label="object",
                    label_index=0,
                    embedding=mask_pooled_embedding(dense, weights),
                )
            )
        return results
