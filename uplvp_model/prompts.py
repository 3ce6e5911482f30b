"""Prompt encoder: one D-dim prompt per pseudo mask, fused from four switchable parts.

Per pseudo mask ("prompt") of an image the encoder sums

    (a) pooled:    features of ``prompt_features`` averaged inside the mask (if ``"masks"`` are
                   given and non-empty) or inside the box, then a Linear(D, D);
    (b) position:  sine encoding of the box as (cx, cy, w, h) (``box_position_encoding``), then a
                   Linear(D, D);
    (c) shape:     the G x G shape grid flattened, then Linear(G*G, D) - ReLU - Linear(D, D);
    (d) embedding: the cached CLIP embedding, Linear(E, D); contributes nothing for an image
                   whose dict has no ``"embeddings"`` (absent or None);

and applies a LayerNorm(D). A part switched off is not built (no parameters) and adds nothing.
The reference (UPLVP) uses (a) alone with box pooling on the last FPN level and no projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uplvp_model.position_encoding import box_position_encoding


def box_pool_weights(boxes: Tensor, height: int, width: int) -> Tensor:
    """Fraction of each feature cell covered by each box: [P, 4] -> [P, height, width] float.

    ``boxes`` are xyxy normalised to [0, 1]. A box narrower or shorter than one cell is widened
    around its centre to one cell, so every box covers a positive area (weights sum > 0).
    """
    scale = boxes.new_tensor([width, height, width, height], dtype=torch.float32)
    x0, y0, x1, y1 = (boxes.float() * scale).unbind(-1)

    def overlaps(lo: Tensor, hi: Tensor, size: int) -> Tensor:
        centre = (lo + hi) / 2
        thin = (hi - lo) < 1.0
        lo = torch.where(thin, centre - 0.5, lo).clamp(0.0, float(size))
        hi = torch.where(thin, centre + 0.5, hi).clamp(0.0, float(size))
        cells = torch.arange(size, device=boxes.device, dtype=torch.float32)
        return (torch.minimum(hi[:, None], cells + 1) - torch.maximum(lo[:, None], cells)).clamp(min=0.0)

    return overlaps(y0, y1, height)[:, :, None] * overlaps(x0, x1, width)[:, None, :]


def mask_pool_weights(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Pooling weights from masks [P, H', W'] (any resolution) -> [P, height, width] float.

    Each mask is area-resampled to the feature size (weight = covered fraction of the cell);
    a prompt whose resampled mask is empty falls back to its box weights.
    """
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width), dtype=torch.float32)
    weights = F.interpolate(masks[:, None].float(), size=(height, width), mode="area")[:, 0]
    empty = weights.flatten(1).sum(1) <= 0
    if bool(empty.any()):
        weights = torch.where(empty[:, None, None], box_pool_weights(boxes, height, width), weights)
    return weights


def weighted_pool(features: Tensor, weights: Tensor) -> Tensor:
    """Weighted average of ``features`` [D, h, w] under each of ``weights`` [P, h, w] -> [P, D]."""
    weights = weights.to(features.dtype)
    total = torch.einsum("phw,dhw->pd", weights, features)
    return total / weights.flatten(1).sum(1, keepdim=True).clamp(min=1e-12)


class PromptEncoder(nn.Module):
    """Encode per-image pseudo-mask prompts into D-dim prompt vectors (see module docstring).

    Args:
        d_model: D, the kernel / feature width (multiple of 8 when ``use_position``).
        embedding_dim: E, width of the cached CLIP embeddings (required when ``use_embedding``).
        grid_size: G, side of the shape grids.
        use_pooled / use_position / use_shape / use_embedding: switch each part on or off.
    """

    def __init__(
        self,
        d_model: int,
        embedding_dim: int | None,
        grid_size: int,
        *,
        use_pooled: bool = True,
        use_position: bool = True,
        use_shape: bool = True,
        use_embedding: bool = True,
    ) -> None:
        super().__init__()
        if not (use_pooled or use_position or use_shape or use_embedding):
            raise ValueError("PromptEncoder: at least one of pooled/position/shape/embedding must be on")
        if use_position and d_model % 8:
            raise ValueError(f"PromptEncoder: d_model must be a multiple of 8 for the box encoding, got {d_model}")
        if use_embedding and (embedding_dim is None or embedding_dim < 1):
            raise ValueError(f"PromptEncoder: use_embedding needs a positive embedding_dim, got {embedding_dim}")
        if grid_size < 1:
            raise ValueError(f"PromptEncoder: grid_size must be positive, got {grid_size}")
        self.d_model = d_model
        self.embedding_dim = embedding_dim
        self.grid_size = grid_size
        self.pooled_proj = nn.Linear(d_model, d_model) if use_pooled else None
        self.position_proj = nn.Linear(d_model, d_model) if use_position else None
        self.shape_mlp = (
            nn.Sequential(nn.Linear(grid_size * grid_size, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
            if use_shape
            else None
        )
        self.embedding_proj = nn.Linear(embedding_dim, d_model) if use_embedding else None
        self.norm = nn.LayerNorm(d_model)

    def forward(self, prompt_features: Tensor, prompts: list[dict]) -> list[Tensor]:
        """Encode prompts.

        Args:
            prompt_features: [B, D, h, w] feature map to pool from (coarsest FPN level).
            prompts: B dicts with ``"boxes"`` [P, 4] float xyxy normalised to [0, 1],
                ``"shape_grids"`` [P, G, G] float in {0, 1}, optionally ``"embeddings"`` [P, E]
                (or None) and ``"masks"`` [P, H', W'] bool at any resolution.

        Returns:
            B tensors [P_i, D] (P_i may be 0).
        """
        if prompt_features.dim() != 4 or prompt_features.shape[1] != self.d_model:
            raise ValueError(
                f"PromptEncoder: prompt_features must be [B, {self.d_model}, h, w], "
                f"got {tuple(prompt_features.shape)}"
            )
        if len(prompts) != prompt_features.shape[0]:
            raise ValueError(
                f"PromptEncoder: got {len(prompts)} prompt dicts for a batch of {prompt_features.shape[0]}"
            )
        return [self._encode_image(prompt_features[i], p, i) for i, p in enumerate(prompts)]

    def _encode_image(self, features: Tensor, prompt: dict, index: int) -> Tensor:
        boxes = self._checked(prompt, "boxes", index, features)
        num = boxes.shape[0]
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"PromptEncoder: prompts[{index}]['boxes'] must be [P, 4], got {tuple(boxes.shape)}")
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"PromptEncoder: prompts[{index}]['boxes'] has non-finite values")
        if bool((boxes[:, 2:] < boxes[:, :2]).any()):
            raise ValueError(f"PromptEncoder: prompts[{index}]['boxes'] must be xyxy with x1 >= x0 and y1 >= y0")
        boxes = boxes.clamp(0.0, 1.0)
        out = features.new_zeros((num, self.d_model))
        if self.pooled_proj is not None:
            h, w = features.shape[-2:]
            masks = prompt.get("masks")
            if masks is None:
                weights = box_pool_weights(boxes, h, w)
            else:
                masks = self._checked(prompt, "masks", index, features)
                if masks.dim() != 3 or masks.shape[0] != num:
                    raise ValueError(
                        f"PromptEncoder: prompts[{index}]['masks'] must be [{num}, H, W], got {tuple(masks.shape)}"
                    )
                weights = mask_pool_weights(masks, boxes, h, w)
            out = out + self.pooled_proj(weighted_pool(features, weights))
        if self.position_proj is not None:
            out = out + self.position_proj(box_position_encoding(boxes.to(features.dtype), self.d_model))
        if self.shape_mlp is not None:
            grids = self._checked(prompt, "shape_grids", index, features)
            g = self.grid_size
            if grids.shape != (num, g, g):
                raise ValueError(
                    f"PromptEncoder: prompts[{index}]['shape_grids'] must be [{num}, {g}, {g}], "
                    f"got {tuple(grids.shape)}"
                )
            out = out + self.shape_mlp(grids.to(features.dtype).flatten(1))
        if self.embedding_proj is not None and prompt.get("embeddings") is not None:
            emb = self._checked(prompt, "embeddings", index, features)
            if emb.shape != (num, self.embedding_dim):
                raise ValueError(
                    f"PromptEncoder: prompts[{index}]['embeddings'] must be [{num}, {self.embedding_dim}], "
                    f"got {tuple(emb.shape)}"
                )
            out = out + self.embedding_proj(emb.to(features.dtype))
        return self.norm(out)

    @staticmethod
    def _checked(prompt: dict, key: str, index: int, features: Tensor) -> Tensor:
        """``prompt[key]`` as a tensor on ``features``' device (float unless it is the masks);
        a missing key raises ValueError."""
        value = prompt.get(key)
        if value is None:
            raise ValueError(f"PromptEncoder: prompts[{index}] has no {key!r}")
        value = torch.as_tensor(value, device=features.device)
        if key != "masks" and not value.is_floating_point():
            value = value.float()
        return value
