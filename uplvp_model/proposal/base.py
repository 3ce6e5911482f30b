"""The proposer interface shared by the ``clip``, ``freemask`` and ``classical`` proposers."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np


@dataclass
class ProposedMask:
    """One pseudo instance mask of one image.

    mask: bool ``[H, W]`` at the input image's resolution.
    score: confidence in [0, 1].
    label: best vocabulary entry; label_index: its index in the proposer's ``vocabulary``.
    embedding: float32 ``[E]``, L2-normalised (what it holds depends on the proposer, see
    docs/proposers.md).
    """

    mask: np.ndarray
    score: float
    label: str
    label_index: int
    embedding: np.ndarray


@runtime_checkable
class Proposer(Protocol):
    """Turns RGB images into scored instance masks.

    ``propose`` takes a batch of uint8 ``[H, W, 3]`` RGB images (sizes may differ) and returns,
    per image, its masks sorted by score descending; the same input always gives the same
    output. ``config()`` returns every setting that changes the output (JSON-serialisable), for
    the stage's config hash.
    """

    name: str
    embedding_dim: int
    vocabulary: list[str]

    def propose(self, images: list[np.ndarray]) -> list[list[ProposedMask]]: ...

    def config(self) -> dict[str, Any]: ...


def check_rgb_image(image: np.ndarray, index: int) -> None:
    """Raise ``ValueError`` unless ``image`` is a uint8 ``[H, W, 3]`` array (``index``: its
    position in the batch, for the message)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image {index} must be uint8 [H, W, 3] RGB, got {dtype} {shape}")


def _constructors() -> dict[str, Callable[..., Proposer]]:
    # Imported here because these modules import this one (ProposedMask); importing lazily also
    # keeps torch/open_clip out of a process that only runs the classical proposer.
    from .classical import ClassicalProposer
    from .clip_dense import ClipProposer
    from .freemask import FreeMaskProposer

    return {"classical": ClassicalProposer, "clip": ClipProposer, "freemask": FreeMaskProposer}


PROPOSER_NAMES = ("classical", "clip", "freemask")


def build_proposer(name: str, **options: Any) -> Proposer:
    """Build the proposer called ``name`` (one of :data:`PROPOSER_NAMES`) with its keyword
    options. Unknown names or options raise ``ValueError``."""
    if name not in PROPOSER_NAMES:
        raise ValueError(f"unknown proposer {name!r}; choose one of {', '.join(PROPOSER_NAMES)}")
    constructor = _constructors()[name]
    try:
        inspect.signature(constructor).bind(**options)
    except TypeError as err:
        raise ValueError(f"proposer {name!r}: {err}") from None
    return constructor(**options)
