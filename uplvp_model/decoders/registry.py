"""The registry of query decoders: a decoder module registers its class here with what belongs
to it (``reference_mask_weights``: the BCE / dice weights of its reference implementation,
fine-tuning's defaults). ``build_decoder`` and every config read names from here."""
from __future__ import annotations

from ..registry import Registry

DECODERS = Registry("decoder")
