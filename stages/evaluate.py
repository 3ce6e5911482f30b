"""`uplvp stage evaluate`: COCO mask AP of a fine-tuned checkpoint on a labeled manifest.

checkpoint + manifest -> evaluation loader (``pipeline.coco_dataset.eval_loader``: manifest
order, fixed resize) -> model -> ``pipeline.evaluation`` (inference and post-processing) -> ``predictions.json``
(COCO results) -> COCOeval segm + bbox -> ``metrics.json`` +
``stage.json`` + a per-category table. Formats: ``docs/evaluation.md``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from pipeline.atomic import write_json_atomic
from pipeline.coco_dataset import eval_loader
from pipeline.engine.distributed import resolve_device
from pipeline.engine.progress import progress_mode
from pipeline.errors import InputError
from pipeline.evaluation import (
    check_categories_match,
    evaluate_model,
    load_inference_model,
    print_metrics,
    report_unreadable,
)
from pipeline.manifest import load_manifest
from pipeline.run_record import now_iso, write_run_record
from pipeline.transforms import eval_config
from stages.config import StageConfig

console = Console(stderr=True)

METRICS_FORMAT_VERSION = 1
PREDICTIONS_FILE = "predictions.json"
METRICS_FILE = "metrics.json"
EXIT_SOME_IMAGES_UNREADABLE = 1  # evaluate / predict: done, but some images could not be read


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


