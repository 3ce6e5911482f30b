"""Pre-training samples streamed from a ``propose`` shard folder (``docs/shards.md``).

Opening a folder (:class:`ShardDataset`) validates every shard file (format version, schema,
both files of a shard from the same run, all shards from the same run) and builds a small index
from the ``images/`` files and four narrow columns of the ``masks/`` files (``image_id``,
``score``, ``area``, ``mask_index``): the images with status ``ok`` that keep at least one mask
after filtering (:class:`MaskFilter`). Images without a mask left are skipped and counted.

Loading a sample reads its shard's ``masks/`` file whole (one shard at a time, kept in a small
per-process cache), decodes the kept masks' RLE with pycocotools, unpacks the shape grids and
converts the embeddings to float32; the image is read from ``image_path`` and downscaled exactly
as ``propose`` did (longer side to ``max(height, width)`` of the row) when it is larger.

Epoch order (seeded by ``(seed, epoch)``): the shards are permuted, grouped into windows of
``shards_per_window`` consecutive shards of that permutation, and the images of each window are
shuffled together. A batch thus touches at most two windows' shards, and a window at least as
large as the folder gives a uniform permutation of all images.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from pipeline.batching import BatchLoader, order_rng
from pipeline.errors import InputError
from pipeline.images import ImageReadError, read_image_rgb
from pipeline.shards import (
    IMAGES_SCHEMA,
    MASKS_SCHEMA,
    read_metadata,
    shard_file,
    validate_shard_file,
)
from pipeline.transforms import AugmentConfig, Sample, augment

_SHARD_NAME = re.compile(r"shard-(\d+)\.parquet")
_IMAGE_COLUMNS = ["image_id", "image_path", "height", "width", "status"]
_INDEX_COLUMNS = ["image_id", "score", "area", "mask_index"]
_LOAD_COLUMNS = [*_INDEX_COLUMNS, "height", "width", "rle_counts", "clip_embedding", "shape_grid",
                 "label_index"]


@dataclass(frozen=True)
class MaskFilter:
    """Which pseudo masks are used: ``score >= min_score`` and ``area >= min_area`` (pixels at
    the proposal resolution), then the ``max_masks`` best by score (ties: lower mask_index)."""

    min_score: float = 0.5
    min_area: int = 32
    max_masks: int = 20

    def __post_init__(self) -> None:
        if self.max_masks < 1:
            raise InputError(f"max_masks must be >= 1, got {self.max_masks}")


def kept_rows(
    image_ids: np.ndarray,
    scores: np.ndarray,
    areas: np.ndarray,
    mask_indices: np.ndarray,
    mask_filter: MaskFilter,
) -> dict[int, np.ndarray]:
    """Row numbers of the masks kept per image: ``{image_id: int64 [K]}`` (best score first;
    images with no kept mask absent). The inputs are the columns of one masks table."""
    rows = np.nonzero((scores >= mask_filter.min_score) & (areas >= mask_filter.min_area))[0]
    rows = rows[np.lexsort((mask_indices[rows], -scores[rows], image_ids[rows]))]
    ids, starts, counts = np.unique(image_ids[rows], return_index=True, return_counts=True)
    return {
        int(i): rows[s : s + min(c, mask_filter.max_masks)]
        for i, s, c in zip(ids, starts, counts)
    }


@dataclass(frozen=True)
class _ShardFiles:
    index: int
    masks: Path
    images: Path


class ShardDataset:
    """The usable images of a shard folder as a :class:`~pipeline.batching.SampleSource`.

    Args:
        shard_dir: a ``propose`` output folder (``masks/`` and ``images/`` inside).
        augment_config: resize / flip applied by :meth:`load`.
        mask_filter: which pseudo masks are used.
        grid_size: G of the shape grids (``grid_size`` of the propose run).
        shards_per_window: shards shuffled together in an epoch order (see module docstring).

    ``counts`` reports ``images`` (rows of the images files), ``images_error`` (status error),
    ``images_without_masks`` (ok but no mask left after filtering) and ``images_used``.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        *,
        augment_config: AugmentConfig,
        mask_filter: MaskFilter = MaskFilter(),
        grid_size: int = 32,
        shards_per_window: int = 16,
    ) -> None:
        if shards_per_window < 1:
            raise InputError(f"shards_per_window must be >= 1, got {shards_per_window}")
        self.shard_dir = Path(shard_dir)
        self.augment_config = augment_config
        self.mask_filter = mask_filter
        self.grid_size = grid_size
        self.shards_per_window = shards_per_window
        self.shards = find_shards(self.shard_dir)
        self._build_index()
        self._cache: OrderedDict[int, _LoadedShard] = OrderedDict()

    def _build_index(self) -> None:
        ids, paths, sizes, shard_pos, bounds = [], [], [], [], [0]
        self.counts = {"images": 0, "images_error": 0, "images_without_masks": 0}
        for pos, shard in enumerate(self.shards):
            images = _read_table(shard.images, _IMAGE_COLUMNS)
            masks = _read_table(shard.masks, _INDEX_COLUMNS)
            kept = kept_rows(*(masks[c].to_numpy() for c in _INDEX_COLUMNS), self.mask_filter)
            self.counts["images"] += images.num_rows
            for row in sorted(images.to_pylist(), key=lambda r: r["image_id"]):
                if row["status"] != "ok":
                    self.counts["images_error"] += 1
                elif row["image_id"] not in kept:
                    self.counts["images_without_masks"] += 1
                else:
                    ids.append(row["image_id"])
                    paths.append(row["image_path"])
                    sizes.append((row["height"], row["width"]))
                    shard_pos.append(pos)
            bounds.append(len(ids))
        self.counts["images_used"] = len(ids)
        # arrays rather than Python lists: DataLoader workers share them without copying
        self.image_ids = np.asarray(ids, dtype=np.int64)
        self.image_paths = pa.array(paths, pa.string())
        self.image_sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        self.shard_of = np.asarray(shard_pos, dtype=np.int64)
        self.shard_bounds = bounds  # images of shard position p: [bounds[p], bounds[p + 1])

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def embedding_dim(self) -> int | None:
        """Length of the ``clip_embedding`` column (None when there are no mask rows)."""
        for shard in self.shards:
            column = _read_table(shard.masks, ["clip_embedding"]).column("clip_embedding")
            for chunk in column.chunks:
                if len(chunk):
                    return len(chunk[0])
        return None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # each process keeps its own
        return state

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """Shard permutation, then a shuffle inside each window of ``shards_per_window`` shards."""
        rng = order_rng(seed, epoch)
        shard_order = rng.permutation(len(self.shards))
        parts = []
        for w in range(0, len(shard_order), self.shards_per_window):
            window = np.concatenate(
                [np.arange(self.shard_bounds[p], self.shard_bounds[p + 1])
                 for p in shard_order[w : w + self.shards_per_window]]
            ).astype(np.int64)
            rng.shuffle(window)
            parts.append(window)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def load(self, index: int, rng: np.random.Generator) -> Sample:
        return augment(self.raw_sample(index), self.augment_config, rng)

    def raw_sample(self, index: int) -> Sample:
        """Sample ``index`` at the proposal resolution, before any transform; masks in
        descending score order, labels all 0, ``label_index`` the proposer's vocabulary index
        of each mask (the text loss's target)."""
        image_id = int(self.image_ids[index])
        h, w = (int(v) for v in self.image_sizes[index])
        shard = self._shard(int(self.shard_of[index]))
        rows = shard.rows[image_id]
        if not (shard.sizes[rows] == (h, w)).all():
            raise InputError(f"masks of image {image_id} have another height/width than its "
                             f"images row ({h}x{w})", self.shards[int(self.shard_of[index])].masks)
        masks = mask_utils.decode(
            [{"size": [h, w], "counts": c} for c in shard.rle_counts.take(rows).to_pylist()]
        )
        grids = np.unpackbits(shard.grids[rows], axis=1, count=self.grid_size**2)
        return Sample(
            image_id=image_id,
            image=self._image(index),
            masks=np.ascontiguousarray(masks.transpose(2, 0, 1), dtype=bool),
            labels=np.zeros(len(rows), dtype=np.int64),
            orig_size=(h, w),
            shape_grids=grids.reshape(-1, self.grid_size, self.grid_size).astype(bool),
            embeddings=shard.embeddings[rows].astype(np.float32),
            label_index=shard.label_index[rows],
        )

    def _image(self, index: int) -> np.ndarray:
        h, w = (int(v) for v in self.image_sizes[index])
        path = self.image_paths[index].as_py()
        try:
            image = read_image_rgb(path, max_side=max(h, w))
        except ImageReadError as err:
            raise InputError(f"image of a shard row cannot be read now: {err}", path) from None
        if image.shape[:2] != (h, w):
            raise InputError(
                f"image is {image.shape[0]}x{image.shape[1]} after downscaling to the shard's "
                f"{h}x{w} (height x width): was it replaced after propose?",
                path,
            )
        return image

    def _shard(self, pos: int) -> "_LoadedShard":
        if pos in self._cache:
            self._cache.move_to_end(pos)
            return self._cache[pos]
        loaded = _LoadedShard(self.shards[pos].masks, self.mask_filter, self.grid_size)
        self._cache[pos] = loaded
        while len(self._cache) > 2 * self.shards_per_window:
            self._cache.popitem(last=False)
        return loaded


class _LoadedShard:
    """One masks file in memory: its kept rows per image and the columns a sample needs.

    sizes: int ``[rows, 2]`` (height, width); rle_counts: arrow binary array; grids: uint8
    ``[rows, ceil(G*G/8)]`` packed bits; embeddings: float16 ``[rows, E]``.
    """

    def __init__(self, path: Path, mask_filter: MaskFilter, grid_size: int) -> None:
        table = _read_table(path, _LOAD_COLUMNS)
        self.rows = kept_rows(*(table[c].to_numpy() for c in _INDEX_COLUMNS), mask_filter)
        self.sizes = np.stack([table["height"].to_numpy(), table["width"].to_numpy()], axis=1)
        self.rle_counts = table["rle_counts"].combine_chunks()
        self.grids = _fixed_width(table["shape_grid"], (grid_size * grid_size + 7) // 8, path,
                                  f"shape_grid (grid_size {grid_size})")
        self.embeddings = _embeddings(table["clip_embedding"], path)
        self.label_index = table["label_index"].to_numpy().astype(np.int64)


def _fixed_width(column: pa.ChunkedArray, width: int, path: Path, what: str) -> np.ndarray:
    """A binary column whose values all have ``width`` bytes -> uint8 ``[rows, width]``."""
    lengths = pc.binary_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and not (lengths == width).all():
        raise InputError(f"column {what}: values of {sorted(set(lengths.tolist()))} bytes, "
                         f"expected {width}", path)
    data = b"".join(column.to_pylist())
    return np.frombuffer(data, dtype=np.uint8).reshape(len(lengths), width)


def _embeddings(column: pa.ChunkedArray, path: Path) -> np.ndarray:
    """``clip_embedding`` list<float16> column -> float16 ``[rows, E]`` (one E for all rows)."""
    column = column.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and not (lengths == lengths[0]).all():
        raise InputError(f"column clip_embedding: rows of different lengths "
                         f"{sorted(set(lengths.tolist()))}", path)
    width = int(lengths[0]) if len(lengths) else 0
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(lengths), width)


def _read_table(path: Path, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"cannot read shard data ({err})", path) from None


def proposal_weights(shards: Sequence[_ShardFiles]) -> dict | None:
    """The ``weights`` record (``kind`` none | checkpoint | random, ``source``) of the first of
    ``shards`` (e.g. ``ShardDataset.shards``, already validated), or None when the shards
    predate the record (docs/shards.md)."""
    weights = read_metadata(shards[0].images).get("weights")
    return weights if isinstance(weights, dict) else None


def find_shards(shard_dir: Path) -> list[_ShardFiles]:
    """The folder's shards, validated: both files present, same run, same config hash."""
    image_files = sorted((shard_dir / "images").glob("shard-*.parquet"))
    if not image_files:
        raise InputError("no proposal shards found (expected images/shard-*.parquet)", shard_dir)
    shards, hashes = [], {}
    for images_path in image_files:
        match = _SHARD_NAME.fullmatch(images_path.name)
        if match is None:
            raise InputError("unexpected file name in a shard folder", images_path)
        index = int(match.group(1))
        masks_path = shard_file(shard_dir, "masks", index)
        if not masks_path.is_file():
            raise InputError(f"shard {index} is incomplete: {masks_path} is missing", images_path)
        meta_images = validate_shard_file(images_path, IMAGES_SCHEMA)
        meta_masks = validate_shard_file(masks_path, MASKS_SCHEMA)
        hash_masks, hash_images = meta_masks.get("config_hash"), meta_images.get("config_hash")
        if hash_masks != hash_images:
            raise InputError(
                f"masks and images files of shard {index} come from different propose runs "
                f"(config hash {hash_masks} vs {hash_images})",
                masks_path,
            )
        hashes[index] = hash_images
        shards.append(_ShardFiles(index, masks_path, images_path))
    if len(set(hashes.values())) > 1:
        first = shards[0].index
        other = next(k for k, h in hashes.items() if h != hashes[first])
        raise InputError(
            f"shards come from different propose runs: shard {first} has config hash "
            f"{hashes[first]}, shard {other} has {hashes[other]}",
            shard_dir,
        )
    return sorted(shards, key=lambda s: s.index)


def pretrain_loader(
    shard_dir: str | Path,
    batch_size: int,
    *,
    seed: int,
    augment_config: AugmentConfig = AugmentConfig(),
    mask_filter: MaskFilter = MaskFilter(),
    grid_size: int = 32,
    shards_per_window: int = 16,
    num_workers: int = 0,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> BatchLoader:
    """The pre-training loader: shuffled, augmented, last incomplete global batch dropped.
    ``loader.source.counts`` reports the skipped images (counted in this process, so with
    persistent workers their shard windows stay warm while the counts stay right)."""
    dataset = ShardDataset(
        shard_dir,
        augment_config=augment_config,
        mask_filter=mask_filter,
        grid_size=grid_size,
        shards_per_window=shards_per_window,
    )
    return BatchLoader(
        dataset, batch_size, seed=seed, shuffle=True, drop_last=True,
        num_workers=num_workers, persistent_workers=persistent_workers, pin_memory=pin_memory,
        rank=rank, world_size=world_size,
    )
