"""Mask2Former-style masked-attention transformer decoder.

Queries are the kernels [B, N, D] (plus a learned query position embedding). Layer i attends to
FPN level ``i % L`` of ``multi_scale`` (coarse to fine, round robin) with masked cross-attention:
a query may only look at pixels where its mask predicted by the previous layer, resized to that
level, has sigmoid >= 0.5 (a query whose mask is empty there looks everywhere). Then
self-attention and an FFN (post-norm). After the input queries and after every layer the shared
heads predict class logits (Linear) and mask logits (MLP mask embedding . ``mask_features``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .registry import DECODERS
from ..position_encoding import sine_position_map


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them: [..., in] -> [..., out]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskedAttentionLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each with residual and LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.cross_attn = nn.MultiheadAttention(d, cfg.num_heads, dropout=cfg.dropout,
                                                batch_first=True)
        self.cross_norm = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, cfg.num_heads, dropout=cfg.dropout,
                                               batch_first=True)
        self.self_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_dim, d), nn.Dropout(cfg.dropout),
        )
        self.ffn_norm = nn.LayerNorm(d)

    def forward(self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                blocked: Tensor) -> Tensor:
        """``queries``/``query_pos`` [B, N, D]; ``memory``/``memory_pos`` [B, hw, D];
        ``blocked`` [B, N, hw] bool, True = the query may not attend to that pixel."""
        attn_mask = blocked.repeat_interleave(self.num_heads, dim=0)
        attended = self.cross_attn(queries + query_pos, memory + memory_pos, memory,
                                   attn_mask=attn_mask, need_weights=False)[0]
        queries = self.cross_norm(queries + attended)
        q = queries + query_pos
        queries = self.self_norm(queries + self.self_attn(q, q, queries, need_weights=False)[0])
        return self.ffn_norm(queries + self.ffn(queries))


@DECODERS.register("mask2former", reference_mask_weights={"bce": 5.0, "dice": 5.0})
class Mask2FormerDecoder(nn.Module):
    """Initial queries plus ``num_stages`` :class:`MaskedAttentionLayer` s.

    ``forward(features, kernels)`` uses ``features["multi_scale"]`` (coarse to fine) as
    attention memory and ``features["mask_features"]`` for the masks. ``aux_outputs`` holds the
    predictions from the input queries followed by those of layers 1..S-1; the top level holds
    the last layer's. ``kernels`` in each output is the query state after that layer.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.num_levels = cfg.num_feature_levels
        self.init_kernels = nn.Embedding(cfg.num_kernels, d)
        self.query_pos = nn.Embedding(cfg.num_kernels, d)
        self.level_embed = nn.Embedding(cfg.num_feature_levels, d)
        self.layers = nn.ModuleList(MaskedAttentionLayer(cfg) for _ in range(cfg.num_stages))
        self.decoder_norm = nn.LayerNorm(d)
        self.class_head = nn.Linear(d, cfg.num_classes + 1)
        self.mask_embed = MLP(d, d, d, cfg.m2f_mask_mlp_layers)

    def class_heads(self) -> list[nn.Linear]:
        """Every Linear whose output size is num_classes + 1."""
        return [self.class_head]

    def _predict(self, queries: Tensor, mask_features: Tensor, next_size: tuple[int, int]
                 ) -> tuple[dict, Tensor]:
        """Heads on ``queries`` [B, N, D] -> (outputs dict, blocked [B, N, h*w] for the next
        layer's level of size ``next_size``)."""
        normed = self.decoder_norm(queries)
        logits = self.class_head(normed)
        masks = torch.einsum("bnd,bdhw->bnhw", self.mask_embed(normed), mask_features)
        resized = F.interpolate(masks.detach(), size=next_size, mode="bilinear",
                                align_corners=False)
        blocked = resized.flatten(2).sigmoid() < 0.5
        blocked[blocked.all(dim=-1)] = False
        return {"pred_logits": logits, "pred_masks": masks, "kernels": queries}, blocked

    def forward(self, features: dict, kernels: Tensor) -> dict:
        levels = features["multi_scale"][: self.num_levels]
        if len(levels) < self.num_levels:
            raise ValueError(
                f"Mask2Former decoder needs {self.num_levels} feature levels, got {len(levels)}"
            )
        mask_features = features["mask_features"]
        memories, memory_pos = [], []
        for i, level in enumerate(levels):
            _, d, h, w = level.shape
            pos = sine_position_map(h, w, d, device=level.device, dtype=level.dtype)
            memories.append((level + self.level_embed.weight[i][:, None, None]).flatten(2)
                            .transpose(1, 2))
            memory_pos.append(pos.flatten(1).transpose(0, 1)[None])
        query_pos = self.query_pos.weight[None].expand(kernels.shape[0], -1, -1)

        queries = kernels
        outputs, blocked = self._predict(queries, mask_features, levels[0].shape[-2:])
        stage_outputs = [outputs]
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            queries = layer(queries, query_pos, memories[lvl], memory_pos[lvl], blocked)
            next_size = levels[(i + 1) % self.num_levels].shape[-2:]
            outputs, blocked = self._predict(queries, mask_features, next_size)
            stage_outputs.append(outputs)
        return {**stage_outputs[-1], "aux_outputs": stage_outputs[:-1]}
