"""Loader workers: compact masks across processes, persistent workers, pinning off on CPU."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.batching import BatchLoader, collate
from pipeline.compact_masks import CompactMasks, expand_batch_masks
from pipeline.transforms import Sample


def test_compact_masks_round_trip_exactly_with_boxes():
    masks = np.zeros((4, 5, 7), dtype=bool)
    masks[0, 1:3, 2:6] = True                   # a 2 x 4 box
    masks[0, 2, 3] = False                      # a hole inside it is kept
    masks[1, 4, 0] = masks[1, 0, 6] = True      # two corners: the box is the whole image
    masks[3, 3, 5] = True                       # one pixel; mask 2 stays empty
    compact = CompactMasks.from_dense(masks, frame=(8, 9))
    assert compact.shape == (4, 8, 9)
    assert compact.boxes.tolist() == [[1, 3, 2, 6], [0, 5, 0, 7], [0, 0, 0, 0], [3, 4, 5, 6]]
    # 8 + 35 + 0 + 1 = 44 box pixels -> 6 bytes of bits
    assert compact.bits.nbytes == 6 and compact.dense_nbytes == 4 * 8 * 9
    dense = compact.to_dense()
    assert dense.dtype == torch.bool and dense.shape == (4, 8, 9)
    expected = torch.zeros(4, 8, 9, dtype=torch.bool)
    expected[:, :5, :7] = torch.from_numpy(masks)
    assert torch.equal(dense, expected)


def test_compact_masks_random_and_empty_and_size():
    rng = np.random.default_rng(0)
    masks = np.zeros((30, 200, 300), dtype=bool)
    for m in masks:  # random blobs of noisy pixels inside random boxes
        y, x = rng.integers(0, 180), rng.integers(0, 270)
        h, w = rng.integers(1, 20), rng.integers(1, 30)
        m[y : y + h, x : x + w] = rng.random((h, w)) < 0.7
    compact = CompactMasks.from_dense(masks)
    assert torch.equal(compact.to_dense(), torch.from_numpy(masks))
    assert compact.nbytes * 50 < compact.dense_nbytes  # small objects: > 50x smaller here
    none = CompactMasks.from_dense(np.zeros((0, 6, 4), dtype=bool), frame=(8, 8))
    assert none.to_dense().shape == (0, 8, 8)
    with pytest.raises(ValueError, match="smaller than the masks"):
        CompactMasks.from_dense(masks, frame=(100, 300))


class _Source:
    """Planted samples: image i has i % 3 + 1 random masks of its own size (sizes vary, so
    batches pad); worker processes record their pid in ``pid_dir``."""

    def __init__(self, n: int, pid_dir=None) -> None:
        self.n, self.pid_dir = n, pid_dir

    def __len__(self) -> int:
        return self.n

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(self.n)

    def load(self, index: int, rng: np.random.Generator) -> Sample:
        if self.pid_dir is not None:
            (self.pid_dir / str(os.getpid())).touch()
        h, w = 40 + 8 * (index % 4), 48 + 4 * (index % 5)
        masks = rng.random((index % 3 + 1, h, w)) < 0.3
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        return Sample(index + 1, image, masks, np.arange(len(masks)), (h, w))


def _batches(loader: BatchLoader, epoch: int, start: int = 0) -> list[dict]:
    return list(loader.make_batches(epoch, start))


def _same(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x["image_ids"] != y["image_ids"] or not torch.equal(x["images"], y["images"]):
            return False
        for tx, ty in zip(x["targets"], y["targets"], strict=True):
            if not (isinstance(tx["masks"], torch.Tensor) and torch.equal(tx["masks"], ty["masks"])
                    and torch.equal(tx["labels"], ty["labels"])):
                return False
    return True


def test_collate_compact_masks_expand_to_the_dense_batch():
    source = _Source(3)
    samples = [source.load(i, np.random.default_rng(i)) for i in range(3)]
    dense = collate(samples)
    compact = collate(samples, compact_masks=True)
    assert all(isinstance(t["masks"], CompactMasks) for t in compact["targets"])
    assert _same([dense], [expand_batch_masks(compact)])


def test_persistent_workers_serve_every_epoch_like_one_process(tmp_path):
    reference = BatchLoader(_Source(10), 2, seed=5)
    loader = BatchLoader(_Source(10, tmp_path), 2, seed=5, num_workers=2, persistent_workers=True)
    assert loader.pin_memory is False  # no CUDA here: pinning is off whatever was asked
    first = _batches(loader, 0)
    assert _same(first, _batches(reference, 0))
    pids = {p.name for p in tmp_path.iterdir()}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two worker processes built them
    assert _same(_batches(loader, 1), _batches(reference, 1))
    assert _same(_batches(loader, 1, start=3), _batches(reference, 1)[3:])
    partial = loader.make_batches(2)
    next(partial)  # an epoch abandoned after one batch (a max_steps stop) ...
    assert _same(_batches(loader, 3), _batches(reference, 3))  # ... leaves the next one intact
    assert {p.name for p in tmp_path.iterdir()} == pids  # the same two processes throughout
    assert _batches(loader, 0, start=5) == []


def test_fresh_workers_each_epoch_without_persistence(tmp_path):
    reference = BatchLoader(_Source(6), 2, seed=1)
    loader = BatchLoader(_Source(6, tmp_path), 2, seed=1, num_workers=2)
    assert _same(_batches(loader, 0), _batches(reference, 0))
    assert _same(_batches(loader, 1), _batches(reference, 1))
    assert len(list(tmp_path.iterdir())) == 4  # 2 new worker processes per epoch


def test_stage_data_section_resolves_pinning_from_the_device():
    from stages.training_setup import DataSection

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert DataSection().worker_options(cuda) == {
        "num_workers": 2, "persistent_workers": True, "pin_memory": True}
    assert DataSection().worker_options(cpu)["pin_memory"] is False
    assert DataSection(pin_memory=False).worker_options(cuda)["pin_memory"] is False
    assert DataSection(persistent_workers=False).worker_options(cpu)["persistent_workers"] is False
