"""Samples -> the training batches of the contract (``docs/data_loading.md``), deterministically.

- :func:`collate` turns transformed :class:`~pipeline.transforms.Sample` s into the batch dict
  (normalised, zero-padded images; padded masks; prompts with boxes normalised by the padded
  size).
- :class:`BatchLoader` serves ``make_batches(epoch, start_batch)``: an epoch's sample order comes
  from the source (seeded by ``(seed, epoch)``), is cut into global batches of ``batch_size``,
  and rank r of W takes the r-th contiguous slice of ``batch_size / W`` samples of each. Sample i's
  augmentation draws from ``numpy.random.default_rng([seed, epoch, 1, i])``. With
  ``num_workers > 0`` a torch ``DataLoader`` runs an ``IterableDataset`` whose worker k builds
  the batches ``k, k + K, k + 2K, ...`` of the epoch, and the main process re-orders them by batch
  number, so the batches never depend on the worker count, timing or global RNG state. Masks
  cross the process boundary compactly (``pipeline.compact_masks``); workers may persist across
  epochs (``persistent_workers``) and batches may be pinned for the GPU (``pin_memory``).
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.compact_masks import CompactMasks, expand_batch_masks
from pipeline.errors import InputError, UnreadableImage
from pipeline.transforms import Sample, mask_boxes_xyxy, normalize_image, padded_size


class SampleSource(Protocol):
    """A dataset as :class:`BatchLoader` sees it: indexed samples, an epoch order, transforms."""

    def __len__(self) -> int: ...

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's sample indices (int64 ``[len(self)]``, a permutation), from (seed, epoch)."""
        ...

    def load(self, index: int, rng: np.random.Generator) -> Sample:
        """Sample ``index`` read and transformed; its randomness drawn from ``rng`` only."""
        ...


def collate(samples: Sequence[Sample], compact_masks: bool = False) -> dict:
    """Batch dict of the training contract from transformed samples.

    Returns ``images`` float32 [B, 3, H, W] (normalised, zero-padded bottom/right to multiples of
    32), ``image_ids``, ``image_sizes`` ``[(h, w)]`` (valid region), ``orig_sizes``, ``targets``
    (``masks`` bool [M, H, W] padded, ``labels`` int64 [M], and ``label_index`` int64 [M] when
    the samples carry it: shard samples, the proposer's vocabulary index); and, when the samples
    carry shape
    grids, ``prompts``: ``boxes`` float32 [M, 4] xyxy divided by the padded (W, H, W, H),
    ``shape_grids`` float32 [M, G, G] in {0, 1}, ``embeddings`` float32 [M, E].
    ``compact_masks``: each target's ``masks`` is a
    :class:`~pipeline.compact_masks.CompactMasks` of that padded tensor instead (what a worker
    process sends; :func:`~pipeline.compact_masks.expand_batch_masks` restores the tensor).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    sizes = [tuple(int(v) for v in s.image.shape[:2]) for s in samples]
    pad_h, pad_w = padded_size(sizes)
    images = torch.zeros((len(samples), 3, pad_h, pad_w), dtype=torch.float32)
    targets, prompts = [], []
    scale = torch.tensor([pad_w, pad_h, pad_w, pad_h], dtype=torch.float32)
    for i, (sample, (h, w)) in enumerate(zip(samples, sizes)):
        images[i, :, :h, :w] = torch.from_numpy(normalize_image(sample.image))
        if compact_masks:
            masks = CompactMasks.from_dense(sample.masks, frame=(pad_h, pad_w))
        else:
            masks = torch.zeros((sample.masks.shape[0], pad_h, pad_w), dtype=torch.bool)
            masks[:, :h, :w] = torch.from_numpy(sample.masks)
        target = {"masks": masks, "labels": torch.as_tensor(sample.labels, dtype=torch.long)}
        if sample.label_index is not None:
            target["label_index"] = torch.as_tensor(sample.label_index, dtype=torch.long)
        targets.append(target)
        if sample.shape_grids is not None:
            embeddings = sample.embeddings
            if embeddings is None:
                embeddings = np.zeros((sample.masks.shape[0], 0), dtype=np.float32)
            prompts.append(
                {
                    "boxes": torch.from_numpy(mask_boxes_xyxy(sample.masks)) / scale,
                    "shape_grids": torch.from_numpy(sample.shape_grids.astype(np.float32)),
                    "embeddings": torch.from_numpy(np.asarray(embeddings, dtype=np.float32)),
                }
            )
    batch = {
        "images": images,
        "image_ids": [int(s.image_id) for s in samples],
        "image_sizes": sizes,
        "orig_sizes": [tuple(int(v) for v in s.orig_size) for s in samples],
        "targets": targets,
    }
    if prompts:
        if len(prompts) != len(samples):
            raise ValueError("either every sample or none carries prompt ingredients")
        batch["prompts"] = prompts
    return batch


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index``'s augmentation in ``epoch``."""
    return np.random.default_rng([seed, epoch, 1, index])


def order_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's sample order (a stream distinct from every sample's)."""
    return np.random.default_rng([seed, epoch, 0])


def distributed_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BatchLoader:
    """``make_batches(epoch, start_batch)`` over a :class:`SampleSource` (see module docstring).

    Args:
        source: the dataset.
        batch_size: the GLOBAL batch size (summed over ranks); must be divisible by world_size.
        seed: seeds the epoch order and every sample's augmentation.
        shuffle: use ``source.epoch_order``; False keeps the index order ``0..N-1``.
        drop_last: drop the last incomplete global batch (training: every rank then runs the
            same number of steps). Without it the last global batch is cut into per-rank slices
            that may be short or empty; an empty slice is not yielded.
        num_workers: DataLoader worker processes (0: build batches in this process). Workers
            send each target's masks as :class:`~pipeline.compact_masks.CompactMasks` (box
            crops, bit-packed); the main process expands them, so a batch is the same tensor
            for tensor whatever the worker count.
        persistent_workers: keep the worker processes (and what their source caches, e.g. the
            shard window) from one ``make_batches`` call to the next instead of starting new
            ones each epoch; they learn the epoch and start batch through a shared tensor.
        pin_memory: put the batches' tensors in page-locked memory (with workers; only when
            CUDA is available) so the trainer's ``non_blocking`` copies overlap with compute.
        rank, world_size: this process's place; None takes them from ``torch.distributed``.
        skip_unreadable: a sample whose image cannot be decoded (the source raises
            :class:`~pipeline.errors.UnreadableImage`) is left out of its batch and listed in
            the batch's ``unreadable`` (``[{"image_id", "file_name", "error"}]``); a batch
            whose every image failed has ``image_ids == []`` and no ``images``. Off: the
            error stops the loop (training).
        collate_fn: ``samples -> batch`` for sources whose ``load`` returns something other
            than a :class:`~pipeline.transforms.Sample` (e.g. ``pipeline.ssl_views``' view
            pairs); None: :func:`collate`. Must be picklable (a module-level function).
    """

    def __init__(
        self,
        source: SampleSource,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        skip_unreadable: bool = False,
        collate_fn: Callable[[Sequence], dict] | None = None,
    ) -> None:
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if rank is None:
            rank, world_size = distributed_rank_world()
        assert world_size is not None
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise InputError(
                f"batch_size {batch_size} must be a positive multiple of the number of "
                f"processes ({world_size})"
            )
        if num_workers < 0:
            raise InputError(f"num_workers must be >= 0, got {num_workers}")
        if drop_last and len(source) < batch_size:
            raise InputError(
                f"only {len(source)} usable images, fewer than one batch of {batch_size}"
            )
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.rank = rank
        self.world_size = world_size
        self.skip_unreadable = skip_unreadable
        if collate_fn is not None and skip_unreadable:
            raise ValueError("skip_unreadable works with the default collate only")
        self.collate_fn = collate_fn
        self._plan = _EpochPlan(source, batch_size, rank, world_size, seed, shuffle, drop_last)
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, start
        self._workers: DataLoader | None = None  # the persistent DataLoader, once started

    @property
    def per_rank_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def batches_per_epoch(self) -> int:
        """Global batches (= steps) per epoch."""
        return self._plan.batches_per_epoch()

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's sample indices of each global batch of ``epoch`` (possibly empty lists
        at the end when ``drop_last`` is off)."""
        return self._plan.rank_batches(epoch)

    def make_batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
        """This rank's batches of ``epoch`` from global batch number ``start_batch`` on."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        units = self._plan.units(epoch, start_batch)
        if not units:
            return iter(())
        if self.num_workers == 0 or (len(units) == 1 and self._workers is None):
            build = _BatchBuilder(self.source, self.seed, epoch, self.skip_unreadable,
                                  collate_fn=self.collate_fn)
            return (build(unit) for unit in units)
        self._position[0], self._position[1] = epoch, start_batch  # read by the workers
        if self.persistent_workers:
            if self._workers is None:
                self._workers = self._dataloader(self.num_workers)
            loader = self._workers
        else:
            loader = self._dataloader(min(self.num_workers, len(units)))
        return _in_order(iter(loader), self.pin_memory)

    def _dataloader(self, workers: int) -> DataLoader:
        return DataLoader(
            _WorkerStream(self._plan, self._position, self.skip_unreadable, self.collate_fn),
            batch_size=None,
            num_workers=workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            collate_fn=_identity,
            generator=torch.Generator().manual_seed(0),  # leaves the global torch RNG alone
        )


class _EpochPlan:
    """Which samples make this rank's batches of an epoch (picklable, for the workers)."""

    def __init__(self, source: SampleSource, batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle: bool, drop_last: bool) -> None:
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last

    def batches_per_epoch(self) -> int:
        n = len(self.source)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.source)
        order = self.source.epoch_order(self.seed, epoch) if self.shuffle else np.arange(n)
        b = self.batch_size // self.world_size
        lo = self.rank * b
        return [
            [int(i) for i in order[start : start + self.batch_size][lo : lo + b]]
            for start in range(0, self.batches_per_epoch() * self.batch_size, self.batch_size)
        ]

    def units(self, epoch: int, start_batch: int) -> list[list[int]]:
        """The non-empty batches of ``epoch`` from global batch ``start_batch`` on."""
        return [u for u in self.rank_batches(epoch)[start_batch:] if u]


class _BatchBuilder:
    """Picklable ``indices -> batch`` of one epoch (used in this process or in a worker)."""

    def __init__(self, source: SampleSource, seed: int, epoch: int,
                 skip_unreadable: bool = False, compact_masks: bool = False,
                 collate_fn: Callable[[Sequence], dict] | None = None) -> None:
        self.source, self.seed, self.epoch = source, seed, epoch
        self.skip_unreadable, self.compact_masks = skip_unreadable, compact_masks
        self.collate_fn = collate_fn

    def __call__(self, indices: Sequence[int]) -> dict:
        if self.collate_fn is not None:
            return self.collate_fn(
                [self.source.load(i, sample_rng(self.seed, self.epoch, i)) for i in indices])
        if not self.skip_unreadable:
            return collate(
                [self.source.load(i, sample_rng(self.seed, self.epoch, i)) for i in indices],
                compact_masks=self.compact_masks,
            )
        samples, unreadable = [], []
        for i in indices:
            try:
                samples.append(self.source.load(i, sample_rng(self.seed, self.epoch, i)))
            except UnreadableImage as err:
                unreadable.append(err.record())
        batch = collate(samples, self.compact_masks) if samples else {"image_ids": []}
        batch["unreadable"] = unreadable
        return batch


class _WorkerStream(IterableDataset):
    """Yields ``(unit number, batch)`` of the epoch and start batch that ``position`` (a
    shared-memory tensor the main process sets before each pass) names; worker k of K builds
    units ``k, k + K, ...``."""

    def __init__(self, plan: _EpochPlan, position: torch.Tensor, skip_unreadable: bool,
                 collate_fn: Callable[[Sequence], dict] | None = None) -> None:
        super().__init__()
        self.plan, self.position, self.skip_unreadable = plan, position, skip_unreadable
        self.collate_fn = collate_fn

    def __iter__(self) -> Iterator[tuple[int, dict | InputError]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, start_batch = (int(v) for v in self.position.tolist())
        units = self.plan.units(epoch, start_batch)
        build = _BatchBuilder(self.plan.source, self.plan.seed, epoch, self.skip_unreadable,
                              compact_masks=True, collate_fn=self.collate_fn)
        for u in range(worker, len(units), workers):
            try:
                yield u, build(units[u])
            except InputError as err:  # re-raised as one clear line in the main process
                yield u, err
                return


def _identity(item):
    return item


def _in_order(items: Iterator[tuple[int, dict | InputError]], pin_memory: bool = False
              ) -> Iterator[dict]:
    """Re-order ``(number, batch)`` pairs arriving in any order into 0, 1, 2, ..., with their
    compact masks expanded; a worker's InputError is raised here."""
    pending: dict[int, dict] = {}
    expected = 0
    for number, batch in items:
        if isinstance(batch, InputError):
            raise batch
        pending[number] = batch
        while expected in pending:
            batch = pending.pop(expected)
            yield expand_batch_masks(batch, pin_memory) if isinstance(batch, dict) else batch
            expected += 1
    if pending:
        raise RuntimeError(f"batches {sorted(pending)} arrived but batch {expected} never did")
