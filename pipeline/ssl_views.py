"""Two augmented views of every image of an unlabeled manifest: the self-supervised loader.

``view_loader(manifest, batch_size, ...)`` is a :class:`~pipeline.batching.BatchLoader` whose
batches are ``{"view_q": [B, 3, S, S], "view_k": [B, 3, S, S], "image_ids": [...]}``, both views
normalised with the ImageNet statistics (the backbones' input contract). The augmentation is
MoCo v2's (lightly's ``MoCoV2Transform``: random resized crop with scale ``(min_scale, 1)``,
horizontal flip, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, greyscale p 0.2, Gaussian blur p 0.5).

Determinism: like every loader of the project, sample ``i`` of ``epoch`` draws from
``numpy.random.default_rng([seed, epoch, 1, i])`` (``pipeline.batching.sample_rng``). lightly's
transforms draw from the global torch / numpy / ``random`` generators, so each sample's
transform runs with those seeded from its own generator and restored afterwards: the views do
not depend on workers, timing or the training loop's RNG use, and a resumed run sees the same
views an uninterrupted one would.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.batching import BatchLoader, order_rng
from pipeline.errors import InputError, UnreadableImage
from pipeline.images import ImageReadError, read_image_rgb
from pipeline.manifest import ImageRecord, load_manifest


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, numpy's legacy global and ``random`` with ``seed`` inside
    the block and give each back its state afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def moco_v2_transform(image_size: int, min_scale: float = 0.2):
    """lightly's MoCo v2 two-view transform (PIL image -> list of two normalised tensors)."""
    try:
        from lightly.transforms import MoCoV2Transform
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise InputError(f"the backbone stage needs the 'lightly' package ({err}); install "
                         "uplvp with its ssl extra: pip install 'uplvp[ssl]'") from None
    return MoCoV2Transform(input_size=image_size, min_scale=min_scale)


class ViewSource:
    """The images of a manifest (labels, if any, unused) as a
    :class:`~pipeline.batching.SampleSource` of view pairs.

    max_side: images are downscaled so their longer side is at most this before cropping
    (bounds decode-to-crop cost on large photos; None keeps them).
    """

    def __init__(self, records: Sequence[ImageRecord], image_size: int, min_scale: float = 0.2,
                 max_side: int | None = 512) -> None:
        if image_size < 32:
            raise InputError(f"image_size must be >= 32, got {image_size}")
        if not 0.0 < min_scale <= 1.0:
            raise InputError(f"min_scale must be in (0, 1], got {min_scale}")
        self.records = list(records)
        self.image_size = image_size
        self.max_side = max_side
        self.transform = moco_v2_transform(image_size, min_scale)

    def __len__(self) -> int:
        return len(self.records)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return order_rng(seed, epoch).permutation(len(self.records)).astype(np.int64)

    def load(self, index: int, rng: np.random.Generator) -> dict:
        record = self.records[index]
        try:
            image = read_image_rgb(record.path, max_side=self.max_side)
        except ImageReadError as err:
            raise UnreadableImage(str(err), record.path, record.image_id,
                                  record.file_name) from None
        with seeded_global_rngs(int(rng.integers(2**62))):
            view_q, view_k = self.transform(Image.fromarray(image))
        return {"image_id": record.image_id, "view_q": view_q, "view_k": view_k}


def collate_views(samples: Sequence[dict]) -> dict:
    """``{"view_q", "view_k"}`` stacked [B, 3, S, S] and ``image_ids``."""
    return {
        "view_q": torch.stack([s["view_q"] for s in samples]),
        "view_k": torch.stack([s["view_k"] for s in samples]),
        "image_ids": [int(s["image_id"]) for s in samples],
    }


def view_loader(manifest: str | Path, batch_size: int, *, image_size: int = 128,
                min_scale: float = 0.2, max_side: int | None = 512, seed: int = 0,
                num_workers: int = 0, persistent_workers: bool = False,
                pin_memory: bool = False) -> BatchLoader:
    """The loader of view-pair batches over the images of ``manifest`` (shuffled per epoch,
    last incomplete batch dropped, ``batch_size`` global under torch.distributed)."""
    dataset = load_manifest(manifest)
    source = ViewSource(dataset.images, image_size, min_scale, max_side)
    return BatchLoader(source, batch_size, seed=seed, num_workers=num_workers,
                       persistent_workers=persistent_workers, pin_memory=pin_memory,
                       collate_fn=collate_views)
