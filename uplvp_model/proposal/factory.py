"""Build a proposer by name: the one module that imports every proposer (each registers itself
in ``registry.PROPOSERS``), so that no proposer module imports another or this one."""
from __future__ import annotations

import inspect
from typing import Any

from . import classical, clip_dense, freemask, maskcut  # noqa: F401 (they register themselves)
from .base import Proposer
from .registry import PROPOSERS

PROPOSER_NAMES = PROPOSERS.names()
__all__ = ["PROPOSERS", "PROPOSER_NAMES", "build_proposer"]


def build_proposer(name: str, **options: Any) -> Proposer:
    """Build the proposer registered as ``name`` (one of :data:`PROPOSER_NAMES`) with its
    keyword options. Unknown names or options raise ``ValueError``."""
    constructor = PROPOSERS.get(name)
    try:
        inspect.signature(constructor).bind(**options)
    except TypeError as err:
        raise ValueError(f"proposer {name!r}: {err}") from None
    return constructor(**options)
