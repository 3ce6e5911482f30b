"""Proposal shards: the shard plan, the Parquet schemas (versioned), atomic writes, completion.

The sorted image list is cut into fixed shards of ``shard_size`` images numbered from 0; shard k
holds ``masks/shard-0000k.parquet`` (one row per pseudo mask) and ``images/shard-0000k.parquet``
(one row per input image). Each file's Parquet key-value metadata carries the format version, the
stage's config hash and the shard index. The masks file is written first and the images file
last, each atomically, so a shard whose images file exists with the right hash is complete.
See ``docs/shards.md``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.errors import InputError
from pipeline.faults import fault_point

SHARD_FORMAT_VERSION = 1
META_KEY = b"uplvp"  # Parquet key-value metadata key holding a JSON object

MASKS_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("image_path", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask_index", pa.int32()),
        ("rle_counts", pa.binary()),
        ("bbox", pa.list_(pa.float32(), 4)),
        ("area", pa.int64()),
        ("score", pa.float32()),
        ("label", pa.string()),
        ("label_index", pa.int32()),
        ("clip_embedding", pa.list_(pa.float16())),
        ("shape_grid", pa.binary()),
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("image_path", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("num_masks", pa.int32()),
    ]
)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` covers positions ``[start, stop)`` of the sorted image list."""

    index: int
    start: int
    stop: int


def plan_shards(num_images: int, shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise InputError("--shard-size must be >= 1")
    return [
        Shard(k, start, min(start + shard_size, num_images))
        for k, start in enumerate(range(0, num_images, shard_size))
    ]


def parse_shard_list(spec: str, num_shards: int) -> list[int]:
    """``"0,3-5"`` -> ``[0, 3, 4, 5]``; out-of-range or malformed items are an InputError."""
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise InputError(f"--shards: '{part}' is not an index or a range like 3-5")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise InputError(f"--shards: range '{part}' is empty")
        if hi >= num_shards:
            raise InputError(f"--shards: {hi} is out of range (the plan has {num_shards} shards)")
        chosen.update(range(lo, hi + 1))
    if not chosen:
        raise InputError("--shards: no shard given")
    return sorted(chosen)


def array_task_shards(task_index: int, num_tasks: int, num_shards: int) -> list[int]:
    """Shards of array task ``task_index`` of ``num_tasks``: every ``num_tasks``-th shard."""
    if num_tasks < 1:
        raise InputError("--num-shards must be >= 1")
    if not 0 <= task_index < num_tasks:
        raise InputError(f"--shard-index {task_index} must be in [0, {num_tasks - 1}]")
    return list(range(task_index, num_shards, num_tasks))


def shard_file(out_dir: Path, kind: str, index: int) -> Path:
    """``out_dir/{masks|images}/shard-00042.parquet``."""
    return Path(out_dir) / kind / f"shard-{index:05d}.parquet"


def shard_metadata(config_hash: str, index: int, image_rows: Sequence[dict],
                   weights: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``uplvp`` key-value metadata of both files of a shard (docs/shards.md); the counts
    let a reader total a large folder from the Parquet footers alone; ``weights`` (``kind``
    none | checkpoint | random, ``source``) says which model weights made the masks."""
    statuses = [row["status"] for row in image_rows]
    meta = {
        "format_version": SHARD_FORMAT_VERSION,
        "config_hash": config_hash,
        "shard_index": index,
        "num_images": len(image_rows),
        "num_images_ok": statuses.count("ok"),
        "num_images_error": statuses.count("error"),
        "num_masks": sum(int(row["num_masks"]) for row in image_rows),
    }
    if weights is not None:
        meta["weights"] = dict(weights)
    return meta


def write_shard(
    out_dir: Path,
    index: int,
    mask_rows: Sequence[dict],
    image_rows: Sequence[dict],
    config_hash: str,
    weights: dict[str, str] | None = None,
) -> None:
    """Write both files of shard ``index`` atomically: masks first, images (the marker) last."""
    meta = shard_metadata(config_hash, index, image_rows, weights)
    _write_table(shard_file(out_dir, "masks", index), mask_rows, MASKS_SCHEMA, meta)
    fault_point("between-files", index)
    _write_table(shard_file(out_dir, "images", index), image_rows, IMAGES_SCHEMA, meta)


def _write_table(path: Path, rows: Sequence[dict], schema: pa.Schema, meta: dict) -> None:
    table = pa.Table.from_pylist(list(rows), schema=schema)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
        fault_point("mid-write", meta["shard_index"])  # test hook: temp file written, not renamed


def remove_partial_files(out_dir: Path, index: int) -> list[Path]:
    """Delete temporary files (``.tmp-shard-0000k.parquet.*``) that a killed writer of shard
    ``index`` left behind; returns the removed paths. Call only before redoing that shard."""
    removed = []
    for kind in ("masks", "images"):
        final = shard_file(out_dir, kind, index)
        for tmp in sorted(final.parent.glob(f".tmp-{final.name}.*")):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def read_metadata(path: Path) -> dict[str, Any]:
    """The uplvp metadata of a shard file; InputError if unreadable or not a uplvp shard."""
    try:
        kv = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as err:
        raise InputError(f"not a readable Parquet file ({err})", path) from None
    if META_KEY not in kv:
        raise InputError("Parquet file has no uplvp shard metadata", path)
    try:
        return json.loads(kv[META_KEY])
    except json.JSONDecodeError:
        raise InputError("corrupt uplvp shard metadata", path) from None


def shard_status(out_dir: Path, index: int, config_hash: str) -> str:
    """``"complete"`` | ``"missing"`` | ``"stale"`` (another config hash or format version,
    or unreadable) for shard ``index`` under ``out_dir``."""
    paths = [shard_file(out_dir, kind, index) for kind in ("masks", "images")]
    if not all(p.is_file() for p in paths):
        return "missing"
    for p in paths:
        try:
            meta = read_metadata(p)
        except InputError:
            return "stale"
        if (
            meta.get("format_version") != SHARD_FORMAT_VERSION
            or meta.get("config_hash") != config_hash
            or meta.get("shard_index") != index
        ):
            return "stale"
    return "complete"


def validate_shard_file(path: Path, expected_schema: pa.Schema) -> dict[str, Any]:
    """Check a shard file a reader is about to use: readable, uplvp format version, schema."""
    meta = read_metadata(path)
    if meta.get("format_version") != SHARD_FORMAT_VERSION:
        raise InputError(
            f"shard format_version {meta.get('format_version')!r} is not supported "
            f"(this uplvp reads {SHARD_FORMAT_VERSION})",
            path,
        )
    schema = pq.read_schema(path)
    for field in expected_schema:
        if field.name not in schema.names:
            raise InputError(f"shard column '{field.name}' is missing", path)
        if not schema.field(field.name).type.equals(field.type):
            raise InputError(
                f"shard column '{field.name}' has type {schema.field(field.name).type}, "
                f"expected {field.type}",
                path,
            )
    return meta


def read_shard_columns(
    path: Path, columns: list[str], filters: list[tuple] | None = None
) -> pa.Table:
    """Only ``columns`` of a shard file (rows matching ``filters``, if given)."""
    try:
        return pq.read_table(path, columns=columns, filters=filters)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"cannot read shard data ({err})", path) from None
