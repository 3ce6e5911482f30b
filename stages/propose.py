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
from pydantic import field_validator
from rich.console import Console

from pipeline.errors import InputError
from pipeline.executor import ExecutorConfig, run_shards
from pipeline.manifest import load_manifest
from pipeline.run_record import now_iso, write_run_record
from pipeline.text_embeddings import TEXT_EMBEDDINGS_FILE
from pipeline.shards import (
    array_task_shards,
    parse_shard_list,
    plan_shards,
    read_metadata,
    shard_file,
    shard_status,
)
from stages.config import StageConfig
from uplvp_model.proposal.factory import PROPOSERS
from pipeline.engine.progress import LoopProgress, progress_mode
from pipeline.engine.distributed import resolve_device

console = Console(stderr=True)

EXIT_SHARDS_FAILED = 1
BACKBONE_PROPOSERS = ("freemask", "maskcut")  # read --backbone-checkpoint
TEXT_CACHE_FILE = TEXT_EMBEDDINGS_FILE  # the text loss of `pretrain` reads it (docs/shards.md)


class ProposeConfig(StageConfig):
    images: Path  # dataset manifest of the (unlabeled) images
    out: Path
    proposer: str = "classical"  # a registered proposer: classical, clip, freemask, maskcut
    clip_model: str = "ViT-B-16"
    clip_checkpoint: str | None = None
    backbone_checkpoint: str | None = None
    random_weights: bool = False  # allow clip / freemask without a checkpoint (tests, speed)
    vocabulary: Path | None = None
    top_k: int | None = 20  # at most this many masks per image (best first); None or 0: no cap
    min_score: float | None = None  # masks scoring under this are dropped; None: the proposer's
    min_area: int = 32
    options: dict[str, Any] = {}  # further proposer keyword options (see docs/proposers.md)
    shard_size: int = 64
    batch_size: int = 8
    max_side: int = 1024
    grid_size: int = 32
    device: str = "auto"
    # how to run; these do not change the output and are excluded from the config hash
    num_workers: int = 2
    ray_address: str | None = None
    shards: str | None = None
    shard_index: int | None = None
    num_shards: int | None = None
    overwrite: bool = False

    HASH_EXCLUDE = frozenset(
        {"images", "out", "device", "num_workers", "ray_address", "shards", "shard_index",
         "num_shards", "overwrite", "random_weights"}
    )

    @field_validator("proposer")
    @classmethod
    def _known_proposer(cls, value: str) -> str:
        return PROPOSERS.check(value)


def proposer_options(cfg: ProposeConfig) -> dict[str, Any]:
    """Keyword options for ``build_proposer(cfg.proposer, ...)``."""
    options: dict[str, Any] = {"top_k": cfg.top_k or None, "min_area": cfg.min_area}
    if cfg.min_score is not None:
        options["min_score"] = cfg.min_score
    if cfg.proposer == "clip":
        options.update(model_name=cfg.clip_model, checkpoint=cfg.clip_checkpoint,
                       random_weights=cfg.random_weights)
        options["device"] = resolve_device(cfg.device)
        # text embeddings are computed once per (model, vocabulary) and reused by every actor
        # and every rerun; the file carries its key, so a stale one is recomputed
        options["text_cache_file"] = str(Path(cfg.out) / TEXT_CACHE_FILE)
        if cfg.vocabulary is not None:
            options["vocabulary"] = read_vocabulary(cfg.vocabulary)
    elif cfg.proposer in BACKBONE_PROPOSERS:
        options.update(checkpoint=cfg.backbone_checkpoint, random_weights=cfg.random_weights,
                       device=resolve_device(cfg.device))
    options.update(cfg.options)
    return options


def read_vocabulary(path: Path) -> list[str]:
    """One class name per line; blank lines and ``#`` comments ignored."""
    if not Path(path).is_file():
        raise InputError("vocabulary file not found", path)
    names = [
        line.strip()
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not names:
        raise InputError("vocabulary file has no names", path)
    if len(set(names)) != len(names):
        raise InputError("vocabulary file lists a name twice", path)
    return names


def check_weights_given(cfg: ProposeConfig) -> None:
    """A model-based proposer without weights is refused (one line) unless ``random_weights``:
    random weights give meaningless masks that every later stage would accept."""
    backbone = ("--backbone-checkpoint FILE", cfg.backbone_checkpoint,
                "local backbone weights; `uplvp stage backbone` trains them without labels")
    missing = {"clip": ("--clip-checkpoint FILE", cfg.clip_checkpoint,
                        "open_clip weights for --clip-model; benchmarks/train_clip.py trains one"),
               "freemask": backbone, "maskcut": backbone}.get(cfg.proposer)
    if missing is None or missing[1] is not None or cfg.random_weights:
        return
    if cfg.proposer == "clip" and shipped_clip(cfg.clip_model):
        return  # a model the package ships: its weights come with it
    option, _, what = missing
    raise InputError(
        f"--proposer {cfg.proposer} needs {option} ({what}): without weights its masks are "
        "meaningless; pass --random-weights only for a speed or test run"
    )


def shipped_clip(name: str) -> bool:
    """Whether ``name`` is a CLIP the package ships (selected by name, no checkpoint)."""
    from uplvp_model.proposal.shipped import is_shipped

    return is_shipped(name)


def proposal_weights(cfg: ProposeConfig) -> dict[str, str]:
    """Which weights make this run's masks (shard metadata and stage.json ``inputs``):
    ``kind`` none (weight-free classical) | checkpoint | random, and ``source``."""
    if cfg.proposer == "classical":
        return {"kind": "none", "source": "classical (weight-free)"}
    checkpoint = cfg.clip_checkpoint if cfg.proposer == "clip" else cfg.backbone_checkpoint
    model = cfg.clip_model if cfg.proposer == "clip" else backbone_name(cfg)
    if checkpoint is None and cfg.proposer == "clip" and shipped_clip(cfg.clip_model):
        from uplvp_model.proposal.shipped import shipped_model

        card = shipped_model(cfg.clip_model, verify=False).card
        return {"kind": "shipped", "source": f"clip {model}: shipped with uplvp, sha256 "
                                             f"{card['sha256']}"}
    if checkpoint is None:
        return {"kind": "random", "source": f"{cfg.proposer} {model}: random init"}
    return {"kind": "checkpoint", "source": f"{cfg.proposer} {model}: {checkpoint}"}


def backbone_name(cfg: ProposeConfig) -> str:
    """The backbone a freemask / maskcut run reads: its ``backbone`` option, else the one its
    checkpoint names, else ResNet-50 (``uplvp_model.proposal.features``)."""
    from uplvp_model.proposal.features import DEFAULT_BACKBONE, checkpoint_architecture

    if cfg.options.get("backbone"):
        return str(cfg.options["backbone"])
    try:
        named, _ = checkpoint_architecture(cfg.backbone_checkpoint)
    except ValueError as err:  # the proposer's loader reports it; here only the name matters
        raise InputError(str(err)) from None
    return named or DEFAULT_BACKBONE


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
