"""Transformer encoder over the coarsest backbone levels, before the FPN (optional).

Mask2Former's pixel decoder runs 6 multi-scale *deformable* attention layers over the stride 8,
16 and 32 features before its FPN; MaskFormer's ran a plain transformer encoder over stride 32.
:class:`PixelEncoder` is the plain variant over the ``levels`` coarsest maps jointly: each map
is projected to ``dim`` (1x1 convolution + GroupNorm, Mask2Former's ``input_proj``), flattened,
given a learned level embedding and a sine position map (added to queries and keys only, as
DETR does), concatenated, and passed through ``num_layers`` post-norm blocks of multi-head
self-attention and an FFN; the result is split back into maps.

Full attention costs (sum of h * w over the levels)^2 per head: at 128-256 px input that is a
few hundred to a few thousand tokens, at 800 px with 3 levels ~13k (use ``levels`` 2 there).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .position_encoding import sine_position_map


class EncoderLayer(nn.Module):
    """Self-attention (position added to queries and keys) -> FFN, residual + LayerNorm each."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(ffn_dim, dim), nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, position: Tensor) -> Tensor:
        """``tokens`` [B, T, D], ``position`` [1 or B, T, D] -> [B, T, D]."""
        q = tokens + position
        attended = self.attention(q, q, tokens, need_weights=False)[0]
        tokens = self.attention_norm(tokens + attended)
        return self.ffn_norm(tokens + self.ffn(tokens))


class PixelEncoder(nn.Module):
    """``forward(maps)``: maps [B, C_l, h_l, w_l] (the encoded levels, any order) -> the same
    number of maps [B, dim, h_l, w_l] after ``num_layers`` joint self-attention blocks."""

    def __init__(self, in_channels: tuple[int, ...], dim: int, num_layers: int, num_heads: int,
                 ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"PixelEncoder needs num_layers >= 1, got {num_layers}")
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(math.gcd(32, dim), dim))
            for c in in_channels
        )
        self.level_embed = nn.Parameter(torch.zeros(len(in_channels), dim))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList(EncoderLayer(dim, num_heads, ffn_dim, dropout)
                                    for _ in range(num_layers))

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        if len(maps) != len(self.input_proj):
            raise ValueError(f"PixelEncoder expects {len(self.input_proj)} maps, got {len(maps)}")
        tokens, positions, shapes = [], [], []
        for i, (proj, level) in enumerate(zip(self.input_proj, maps)):
            x = proj(level)
            _, d, h, w = x.shape
            shapes.append((h, w))
            tokens.append(x.flatten(2).transpose(1, 2))
            pos = sine_position_map(h, w, d, device=x.device, dtype=x.dtype)
            positions.append(pos.flatten(1).transpose(0, 1)[None] + self.level_embed[i].to(x.dtype))
        x, position = torch.cat(tokens, dim=1), torch.cat(positions, dim=1)
        for layer in self.layers:
            x = layer(x, position)
        out, start = [], 0
        for h, w in shapes:
            out.append(x[:, start:start + h * w].transpose(1, 2).reshape(x.shape[0], -1, h, w))
            start += h * w
        return out
