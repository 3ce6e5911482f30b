"""Inference for evaluation and prediction: a fine-tuned checkpoint loaded for inference, its
predictions over a loader as COCO results, and their COCO scores (distributed: each rank its
slice, rank 0 scores).

Checkpoint keys this module relies on (a file written by ``uplvp_model.checkpoint``, e.g. a
``pipeline.engine.checkpoint`` training checkpoint, read with ``weights_only=True``):
``model`` (state dict), ``category_ids`` (COCO ids of the classes, ascending), the model
config as ``model_config`` (a ``ModelConfig.to_dict()``) or else as ``config["model"]``, and
optionally ``step``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from pipeline.batching import distributed_rank_world
from pipeline.engine.checkpoint import latest_checkpoint
from pipeline.engine.progress import LoopProgress, ProgressMode
from pipeline.errors import InputError
from pipeline.evaluation.coco_eval import evaluate_predictions, without_images
from pipeline.evaluation.postprocess import batch_to_coco_results, check_category_ids
from uplvp_model.checkpoint import read_checkpoint
from uplvp_model.config import ModelConfig
from uplvp_model.model import build_model

console = Console(stderr=True)


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
    dicts (``pipeline.evaluation.postprocess.batch_to_coco_results``), in batch order.

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
