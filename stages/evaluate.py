"""`uplvp stage evaluate`: COCO mask AP of a fine-tuned checkpoint on a labeled manifest.

checkpoint + manifest -> evaluation loader (``pipeline.coco_dataset.eval_loader``: manifest
order, fixed resize) -> model -> ``pipeline.predictions`` post-processing -> ``predictions.json``
(COCO results) -> ``pipeline.evaluation`` (COCOeval segm + bbox) -> ``metrics.json`` +
``stage.json`` + a per-category table. Formats: ``docs/evaluation.md``.

Checkpoint keys this module relies on (a file written by ``uplvp_model.checkpoint``, e.g. a
``stages.train_checkpoint`` training checkpoint, read with ``weights_only=True``):
``model`` (state dict), ``category_ids`` (COCO ids of the classes, ascending), the model
config as ``model_config`` (a ``ModelConfig.to_dict()``) or else as ``config["model"]``, and
optionally ``step``.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from pipeline.atomic import write_json_atomic
from pipeline.batching import distributed_rank_world
from pipeline.coco_dataset import eval_loader
from pipeline.errors import InputError
from pipeline.evaluation import evaluate_predictions, without_images
from pipeline.manifest import load_manifest
from pipeline.predictions import batch_to_coco_results, check_category_ids
from pipeline.run_record import now_iso, write_run_record
from pipeline.transforms import eval_config
from stages.config import StageConfig
from pipeline.engine.progress import LoopProgress, ProgressMode, progress_mode
from pipeline.engine.distributed import resolve_device
from pipeline.engine.checkpoint import latest_checkpoint
from uplvp_model.checkpoint import read_checkpoint
from uplvp_model.config import ModelConfig
from uplvp_model.model import build_model

console = Console(stderr=True)

METRICS_FORMAT_VERSION = 1
PREDICTIONS_FILE = "predictions.json"
METRICS_FILE = "metrics.json"
EXIT_SOME_IMAGES_UNREADABLE = 1  # evaluate / predict: done, but some images could not be read
UNREADABLE_SHOWN = 10  # unreadable images listed on the terminal (all are in the outputs)


class EvaluateConfig(StageConfig):
    checkpoint: Path  # a checkpoint file, or a run folder (its checkpoints/latest is used)
    data: Path  # labeled dataset manifest
    out: Path
    batch_size: int = 2
    short_side: int = 800  # fixed resize: short side, capped by max_long_side
    max_long_side: int = 1333
    score_threshold: float = 0.0
    max_detections: int = 100
    device: str = "auto"
    num_workers: int = 0

    HASH_EXCLUDE = frozenset({"out", "device", "num_workers"})


@dataclass(frozen=True)
class InferenceModel:
    """A model ready for inference (eval mode, on its device) and what it was loaded from.

    category_ids: COCO category id of each class index, ascending. step: the checkpoint's
    optimizer step, or None when it does not record one.
    """

    model: nn.Module
    category_ids: list[int]
    checkpoint: Path
    step: int | None


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a file; for a run folder, the checkpoint its
    ``checkpoints/latest`` names. :class:`InputError` otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise InputError("folder has no checkpoints/latest (give a checkpoint file or a "
                             "training run folder)", path)
        return found
    raise InputError("checkpoint not found", path)


def model_config_of(payload: dict, path: Path) -> ModelConfig:
    """The :class:`ModelConfig` stored in a checkpoint (``model_config`` or ``config.model``),
    with ``backbone_checkpoint`` cleared: every weight comes from the checkpoint itself."""
    values = payload.get("model_config")
    if values is None and isinstance(payload.get("config"), dict):
        values = payload["config"].get("model")
    if not isinstance(values, dict):
        raise InputError("checkpoint has no model config ('model_config' or 'config.model')",
                         path)
    try:
        cfg = ModelConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise InputError(f"checkpoint model config: {err}", path) from None
    return dataclasses.replace(cfg, backbone_checkpoint=None)


def read_model_checkpoint(checkpoint: Path) -> tuple[Path, dict, ModelConfig]:
    """``(file, payload, model config)`` of a checkpoint file or training run folder
    (:func:`resolve_checkpoint`, ``read_checkpoint``, :func:`model_config_of`);
    :class:`InputError` naming the file if any step fails."""
    path = resolve_checkpoint(checkpoint)
    try:
        payload = read_checkpoint(path)
    except ValueError as err:
        raise InputError(str(err)) from None
    return path, payload, model_config_of(payload, path)


def load_inference_model(checkpoint: Path, device: str) -> InferenceModel:
    """Build the checkpoint's model, load its weights (strictly), move it to ``device`` and put
    it in eval mode. :class:`InputError` naming the file on any mismatch."""
    path, payload, cfg = read_model_checkpoint(checkpoint)
    category_ids = payload.get("category_ids")
    if not isinstance(category_ids, list):
        raise InputError("checkpoint has no 'category_ids' list (is it a fine-tuned model?)",
                         path)
    try:
        check_category_ids(category_ids, cfg.num_classes)
    except ValueError as err:
        raise InputError(f"checkpoint category_ids: {err}", path) from None
    model = build_model(cfg)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise InputError(f"weights do not fit the stored model config ({first[0]} ...)",
                         path) from None
    step = payload.get("step")
    return InferenceModel(model.to(device).eval(), list(category_ids), path,
                          step if isinstance(step, int) else None)


def predict_results(model: nn.Module, batches: Iterable[dict], category_ids: Sequence[int], *,
                    device: str | torch.device, max_detections: int = 100,
                    score_threshold: float = 0.0, total: int | None = None,
                    progress: ProgressMode = "off", label: str = "predict",
                    unreadable: list[dict] | None = None) -> list[dict]:
    """Run ``model`` over ``batches`` (contract batch dicts) and post-process to COCO results
    dicts (``pipeline.predictions.batch_to_coco_results``), in batch order.

    Images a ``skip_unreadable`` loader left out (``batch["unreadable"]``) are appended to
    ``unreadable`` when given; a batch without images is passed over.

    The model runs in eval mode under ``torch.inference_mode``; its previous train/eval mode
    is restored afterwards, so a training loop can call this for validation. ``total``: the
    number of batches, for the progress report; ``progress``: ``stages.progress`` mode (a bar
    on a terminal, plain lines in a log, or nothing: ``"off"``, as in validation).
    """
    was_training = model.training
    model.eval()
    results: list[dict] = []
    mode = progress if total else "off"
    try:
        with torch.inference_mode(), LoopProgress(label, total or 0, "batches", console=console,
                                                  mode=mode, rate_unit="images") as report:
            for batch in batches:
                if unreadable is not None:
                    unreadable.extend(batch.get("unreadable", []))
                if batch["image_ids"]:
                    outputs = model(batch["images"].to(device, non_blocking=True))
                    results.extend(batch_to_coco_results(outputs, batch, category_ids,
                                                         max_detections, score_threshold))
                report.advance(1, secondary=len(batch["image_ids"]))
    finally:
        model.train(was_training)
    return results


def evaluate_model(model: nn.Module, batches: Iterable[dict], coco_gt: dict,
                   category_ids: Sequence[int], *, device: str | torch.device,
                   max_detections: int = 100, score_threshold: float = 0.0,
                   total: int | None = None, progress: ProgressMode = "off",
                   unreadable: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """:func:`predict_results` then ``evaluate_predictions(coco_gt, results)``; returns
    ``(metrics, results)``. Images the loader could not read (listed in ``unreadable``, see
    :func:`predict_results`) are left out of the ground truth as well. For in-training
    validation use ``pipeline.evaluation.flat_metrics(metrics, "val/")``.

    Under ``torch.distributed`` every rank calls it with its slice of the evaluation set (an
    ``eval_loader`` built with the group's rank and world size); the results are gathered to
    rank 0, which scores them and returns the metrics of the whole set; the other ranks
    return ``({}, [])``.
    """
    skipped: list[dict] = [] if unreadable is None else unreadable
    results = predict_results(model, batches, category_ids, device=device,
                              max_detections=max_detections, score_threshold=score_threshold,
                              total=total, progress=progress, label="evaluate",
                              unreadable=skipped)
    rank, world = distributed_rank_world()
    if world > 1:  # each rank predicted its slice of every batch: rank 0 scores them all
        gathered = gather_to_rank0((results, list(skipped)))
        if rank != 0:
            return {}, []
        results = sorted((r for part, _ in gathered for r in part),
                         key=lambda r: r["image_id"])  # stable: each image's order is kept
        skipped[:] = sorted((s for _, part in gathered for s in part),
                            key=lambda s: s["image_id"])
    gt = without_images(coco_gt, (r["image_id"] for r in skipped))
    if skipped and not gt["images"]:
        raise InputError(f"none of the {len(skipped)} images could be read (first: "
                         f"{skipped[0]['file_name']}: {skipped[0]['error']})")
    return evaluate_predictions(gt, results), results


def gather_to_rank0(value):
    """The list of every rank's ``value`` (picklable) on rank 0, in rank order; None elsewhere."""
    import torch.distributed as dist

    rank, world = distributed_rank_world()
    parts = [None] * world if rank == 0 else None
    dist.gather_object(value, parts, dst=0)
    return parts


def check_categories_match(dataset_categories: Sequence[dict], category_ids: Sequence[int],
                           checkpoint: Path, manifest: Path) -> None:
    """:class:`InputError` unless the dataset's category ids are the checkpoint's."""
    dataset_ids = sorted(int(c["id"]) for c in dataset_categories)
    if dataset_ids != sorted(category_ids):
        only_ckpt = sorted(set(category_ids) - set(dataset_ids))
        only_data = sorted(set(dataset_ids) - set(category_ids))
        raise InputError(
            f"categories differ from the checkpoint {checkpoint}: only in the checkpoint "
            f"{only_ckpt}, only in the dataset {only_data}", manifest)


def run_evaluate(cfg: EvaluateConfig, progress: bool = True) -> dict:
    """Run the stage; writes ``predictions.json``, ``metrics.json`` and ``stage.json`` into
    ``cfg.out``, prints the per-category table, and returns the ``metrics.json`` content."""
    for name in ("batch_size", "max_detections", "short_side", "max_long_side"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    started = now_iso()
    t0 = time.perf_counter()
    dataset = load_manifest(cfg.data)
    if not dataset.labeled:
        raise InputError("evaluation needs a labeled manifest (no 'annotations' given)",
                         cfg.data)
    device = resolve_device(cfg.device)
    loaded = load_inference_model(cfg.checkpoint, device)
    check_categories_match(dataset.categories, loaded.category_ids, loaded.checkpoint,
                           cfg.data)
    loader = eval_loader(dataset, cfg.batch_size,
                         resize=eval_config(cfg.short_side, cfg.max_long_side),
                         category_map=loaded.category_ids, num_workers=cfg.num_workers,
                         pin_memory=torch.device(device).type == "cuda", rank=0, world_size=1, skip_unreadable=True)
    console.print(f"evaluate: {len(dataset.images)} images of {dataset.name}, checkpoint "
                  f"{loaded.checkpoint} (step {loaded.step}), device {device}")
    unreadable: list[dict] = []
    metrics, results = evaluate_model(
        loaded.model, loader.make_batches(0), dataset.coco, loaded.category_ids, device=device,
        max_detections=cfg.max_detections, score_threshold=cfg.score_threshold,
        total=loader.batches_per_epoch(), progress=progress_mode(progress),
        unreadable=unreadable)
    out = Path(cfg.out)
    write_json_atomic(out / PREDICTIONS_FILE, results)
    report = {
        "format_version": METRICS_FORMAT_VERSION,
        "checkpoint": str(loaded.checkpoint.resolve()),
        "step": loaded.step,
        "dataset": {"manifest": str(Path(cfg.data).resolve()), "name": dataset.name,
                    "annotations": str(dataset.annotations_path)},
        "settings": {k: getattr(cfg, k) for k in ("batch_size", "short_side", "max_long_side",
                                                  "score_threshold", "max_detections")},
        **metrics,
        "unreadable": unreadable,
    }
    write_json_atomic(out / METRICS_FILE, report, indent=2)
    write_run_record(
        out, stage="evaluate", config=cfg.resolved(), config_hash=cfg.config_hash(),
        inputs={"checkpoint": str(loaded.checkpoint), "data": str(cfg.data)},
        counts={"images": metrics["num_images"], "images_unreadable": len(unreadable),
                "predictions": metrics["num_predictions"],
                "seconds": round(time.perf_counter() - t0, 2)},
        started_at=started,
    )
    print_metrics(report)
    report_unreadable(unreadable, len(dataset.images), "evaluate", out / METRICS_FILE,
                      "left out of the scores")
    return report


def report_unreadable(unreadable: Sequence[dict], num_images: int, stage: str, listed_in: Path,
                      consequence: str, out: Console | None = None) -> None:
    """One line per unreadable image (the first :data:`UNREADABLE_SHOWN`) and a total line;
    nothing when every image was read."""
    if not unreadable:
        return
    out = out or console
    out.print(f"{stage}: {len(unreadable)} of {num_images} images could not be read, "
              f"{consequence} (all listed in {listed_in}):", highlight=False)
    for row in unreadable[:UNREADABLE_SHOWN]:
        out.print(f"  {row['file_name']}: {row['error']}", highlight=False)
    if len(unreadable) > UNREADABLE_SHOWN:
        out.print(f"  ... and {len(unreadable) - UNREADABLE_SHOWN} more", highlight=False)


def print_metrics(report: dict, out: Console | None = None) -> None:
    """The summary line and the per-category AP table (AP in %, '-' where undefined)."""
    out = out or Console()
    table = Table(title=f"per-category AP ({report['dataset']['name']})")
    for column in ("id", "category", "instances", "mask AP", "box AP"):
        table.add_column(column, justify="left" if column == "category" else "right")
    box_rows = {r["category_id"]: r for r in report["per_category"].get("bbox", [])}
    for row in report["per_category"]["segm"]:
        table.add_row(str(row["category_id"]), row["name"], str(row["num_gt"]),
                      _percent(row["AP"]),
                      _percent(box_rows.get(row["category_id"], {}).get("AP")))
    out.print(table)
    for iou_type in ("segm", "bbox"):
        if iou_type in report:
            values = ", ".join(f"{k} {_percent(v)}" for k, v in report[iou_type].items())
            out.print(f"{iou_type}: {values}")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
