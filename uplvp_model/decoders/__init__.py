"""Query decoders behind one output contract (see ``docs/model.md``).

``decoder(features, kernels)`` with ``kernels`` [B, N, D] returns ``pred_logits``
[B, N, C+1], ``pred_masks`` [B, N, h, w] (h, w of ``features["mask_features"]``), ``kernels``
[B, N, D] and ``aux_outputs`` (one dict with those three keys per earlier stage, stage 0 =
predictions from the input kernels). Each decoder owns ``init_kernels`` (nn.Embedding N x D)
and lists its class-count-dependent Linear layers in ``class_heads()``.
"""
from __future__ import annotations

from ..config import ModelConfig
from .knet import KNetDecoder
from .mask2former import Mask2FormerDecoder

__all__ = ["KNetDecoder", "Mask2FormerDecoder", "build_decoder"]


def build_decoder(cfg: ModelConfig) -> KNetDecoder | Mask2FormerDecoder:
    """The decoder named by ``cfg.decoder``."""
    if cfg.decoder == "knet":
        return KNetDecoder(cfg)
    if cfg.decoder == "mask2former":
        return Mask2FormerDecoder(cfg)
    raise ValueError(f"unknown decoder {cfg.decoder!r}; choose knet or mask2former")
