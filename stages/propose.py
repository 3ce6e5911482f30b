"""`uplvp stage propose`: pseudo instance masks + prompt ingredients as Parquet shards.

manifest -> sorted image list -> fixed shards -> (local loop | Ray Data actors) -> one
``masks/`` + ``images/`` Parquet file per shard -> ``stage.json``. Completed shards (same config
and image list) are skipped; ``--overwrite`` redoes them. Output contract: ``docs/shards.md``.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from rich.console import Console

from pipeline.errors import InputError
from pipeline.executor import ExecutorConfig, run_shards
from pipeline.manifest import load_manifest
from pipeline.run_record import now_iso, write_run_record
from pipeline.shards import (
    array_task_shards,
    parse_shard_list,
    plan_shards,
    read_metadata,
    shard_file,
    shard_status,
)
from stages.propose_config import (  # noqa: F401 (read_vocabulary, proposal_weights: re-exported)
    ProposeConfig,
    backbone_name,
    check_weights_given,
    proposal_weights,
    proposer_options,
    read_vocabulary,
)
from pipeline.engine.progress import LoopProgress, progress_mode
from pipeline.engine.distributed import resolve_device

console = Console(stderr=True)

EXIT_SHARDS_FAILED = 1


def select_shards(cfg: ProposeConfig, num_shards: int) -> list[int]:
    if cfg.shards is not None and cfg.shard_index is not None:
        raise InputError("give --shards or --shard-index/--num-shards, not both")
    if cfg.shards is not None:
        return parse_shard_list(cfg.shards, num_shards)
    if cfg.shard_index is not None or cfg.num_shards is not None:
        if cfg.shard_index is None or cfg.num_shards is None:
            raise InputError("--shard-index and --num-shards go together")
        return array_task_shards(cfg.shard_index, cfg.num_shards, num_shards)
    return list(range(num_shards))


def image_list_hash(images: list[tuple[int, str]]) -> str:
    blob = json.dumps(images, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def worker_kwargs(cfg: ProposeConfig, images: list[tuple[int, str]], run_hash: str) -> dict:
    """Keyword arguments of :class:`stages.propose_worker.ProposeShardWorker` for this run."""
    return dict(
        images=images,
        out_dir=str(cfg.out),
        config_hash=run_hash,
        proposer=cfg.proposer,
        proposer_options=proposer_options(cfg),
        shard_size=cfg.shard_size,
        batch_size=cfg.batch_size,
        max_side=cfg.max_side,
        grid_size=cfg.grid_size,
        weights=proposal_weights(cfg),
    )


def run_propose(cfg: ProposeConfig, progress: bool = True) -> int:
    """Run the stage; returns the process exit code (0 ok, 1 some shards failed)."""
    started = now_iso()
    t0 = time.perf_counter()
    dataset = load_manifest(cfg.images)
    images = [(im.image_id, str(im.path.resolve())) for im in dataset.images]
    for field in ("shard_size", "batch_size", "max_side", "grid_size", "top_k"):
        if getattr(cfg, field) < 1:
            raise InputError(f"--{field.replace('_', '-')} must be >= 1")
    check_weights_given(cfg)
    shards = plan_shards(len(images), cfg.shard_size)
    selected = select_shards(cfg, len(shards))
    # Shards depend on the config and on the exact image list: both go into the hash.
    run_hash = hashlib.sha256(
        f"{cfg.config_hash()}:{image_list_hash(images)}".encode()
    ).hexdigest()[:16]
    _guard_other_config(cfg, run_hash)

    todo = []
    for index in selected:
        status = shard_status(cfg.out, index, run_hash)
        if status == "complete" and not cfg.overwrite:
            continue
        todo.append(index)
    skipped = len(selected) - len(todo)
    console.print(
        f"propose: proposer={cfg.proposer}, {len(images)} images in {len(shards)} shards of "
        f"{cfg.shard_size}; running {len(todo)} shard(s), {skipped} already complete"
    )
    if cfg.proposer == "classical":
        console.print("proposer 'classical': weight-free OpenCV segmentation (no CLIP model)")
    elif proposal_weights(cfg)["kind"] == "random":
        console.print(f"[yellow]warning: proposer '{cfg.proposer}' runs on RANDOM weights "
                      "(--random-weights): its masks are meaningless (speed / test run)[/yellow]")

    kwargs = worker_kwargs(cfg, images, run_hash)
    executor = ExecutorConfig(num_workers=cfg.num_workers, ray_address=cfg.ray_address)
    summaries = _run_with_progress(todo, kwargs, executor, progress)

    failed = [s for s in summaries if not _succeeded(s, cfg.out, run_hash)]
    setup_errors = {s["setup_error"] for s in failed if "setup_error" in s}
    if setup_errors and len(failed) == len(summaries):
        raise InputError(f"--proposer {cfg.proposer}: {sorted(setup_errors)[0]}")
    for s in failed:
        console.print(f"[red]shard {s['shard']} failed: {s['error']}[/red]")
    totals = dataset_totals(cfg.out, len(shards))
    elapsed = time.perf_counter() - t0
    ran_images = sum(s.get("images", 0) for s in summaries)
    counts = {
        "images": len(images),
        "shards": len(shards),
        "shards_selected": len(selected),
        "shards_run": len(todo),
        "shards_skipped": skipped,
        "shards_failed": [s["shard"] for s in failed],
        "images_per_second": round(ran_images / elapsed, 2) if elapsed > 0 else None,
        "seconds": round(elapsed, 2),
        "worker_seconds": round(sum(s.get("seconds", 0.0) for s in summaries), 2),
        "proposer_seconds": round(sum(s.get("model_seconds", 0.0) for s in summaries), 2),
        **totals,
    }
    write_run_record(
        cfg.out,
        stage="propose",
        config=cfg.resolved(),
        config_hash=run_hash,
        inputs={"images": str(cfg.images), "image_list_hash": image_list_hash(images),
                "weights": proposal_weights(cfg)},
        counts=counts,
        started_at=started,
    )
    _print_summary(counts, summaries)
    return EXIT_SHARDS_FAILED if failed else 0


def _succeeded(summary: dict, out_dir: Path, run_hash: str) -> bool:
    """A shard succeeded if its worker said so, or if its summary was lost when a Ray execution
    stopped (``worker_lost``) but the shard is complete on disk (it finished before the stop)."""
    if summary["status"] == "ok":
        return True
    return bool(summary.get("worker_lost")) and (
        shard_status(out_dir, summary["shard"], run_hash) == "complete"
    )


def _guard_other_config(cfg: ProposeConfig, run_hash: str) -> None:
    record = Path(cfg.out) / "stage.json"
    if not record.is_file() or cfg.overwrite:
        return
    try:
        previous = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if previous.get("stage") == "propose" and previous.get("config_hash") != run_hash:
        raise InputError(
            f"holds shards of another config or image list (hash {previous.get('config_hash')} "
            f"!= {run_hash}); use another --out, or --overwrite to replace them",
            cfg.out,
        )


def _run_with_progress(todo, worker_kwargs, executor, progress) -> list[dict]:
    from stages.propose_worker import ProposeShardWorker

    summaries: list[dict] = []
    with LoopProgress("propose", len(todo), "shards", console=console,
                      mode=progress_mode(progress), rate_unit="images") as report:
        for summary in run_shards(todo, ProposeShardWorker, worker_kwargs, executor):
            summaries.append(summary)
            report.advance(1, secondary=summary.get("images", 0))
    return summaries


def dataset_totals(out_dir: Path, num_shards: int) -> dict[str, Any]:
    """Counts over every shard on disk (also those written by other array tasks)."""
    ok = errors = masks = present = 0
    for index in range(num_shards):
        path = shard_file(out_dir, "images", index)
        if not path.is_file():
            continue
        present += 1
        meta = read_metadata(path)
        if {"num_images_ok", "num_images_error", "num_masks"} <= meta.keys():
            ok += meta["num_images_ok"]  # the footer's counts: no column read
            errors += meta["num_images_error"]
            masks += meta["num_masks"]
            continue
        table = pq.read_table(path, columns=["status", "num_masks"])  # shards without counts
        statuses = table.column("status").to_pylist()
        ok += statuses.count("ok")
        errors += statuses.count("error")
        masks += sum(table.column("num_masks").to_pylist())
    return {
        "shards_on_disk": present,
        "images_ok": ok,
        "images_error": errors,
        "masks": masks,
        "masks_per_image": round(masks / ok, 2) if ok else 0.0,
    }


def _print_summary(counts: dict, summaries: list[dict]) -> None:
    model_s = sum(s.get("model_seconds", 0.0) for s in summaries)
    work_s = sum(s.get("seconds", 0.0) for s in summaries)
    console.print(
        f"propose done in {counts['seconds']} s: shards run {counts['shards_run']}, skipped "
        f"{counts['shards_skipped']}, failed {len(counts['shards_failed'])}; on disk "
        f"{counts['shards_on_disk']}/{counts['shards']} shards, images ok {counts['images_ok']}, "
        f"failed {counts['images_error']}, {counts['masks_per_image']} masks/image"
        + (f"; model time {100 * model_s / work_s:.0f}% of shard time" if work_s > 0 else "")
    )
    for s in summaries:
        for err in s.get("errors", [])[:5]:
            console.print(f"  unreadable image {err['image_path']}: {err['error']}")
