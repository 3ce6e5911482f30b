"""Query decoders behind one output contract (see ``docs/model.md``).

``decoder(features, kernels)`` with ``kernels`` [B, N, D] returns ``pred_logits``
[B, N, C+1], ``pred_masks`` [B, N, h, w] (h, w of ``features["mask_features"]``), ``kernels``
[B, N, D] and ``aux_outputs`` (one dict with those three keys per earlier stage, stage 0 =
predictions from the input kernels). Decoders register by name in ``registry.py``. Each decoder owns ``init_kernels`` (nn.Embedding N x D)
and lists its class-count-dependent Linear layers in ``class_heads()``.
"""
from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .knet import KNetDecoder
from .mask2former import Mask2FormerDecoder
from .registry import DECODERS

__all__ = ["DECODERS", "KNetDecoder", "Mask2FormerDecoder", "build_decoder"]


def build_decoder(cfg: ModelConfig) -> nn.Module:
    """The decoder registered under ``cfg.decoder`` (:data:`DECODERS`); a new decoder module
    registers itself there and is imported above."""
    return DECODERS.get(cfg.decoder)(cfg)
