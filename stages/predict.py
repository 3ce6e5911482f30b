"""`uplvp predict`: instance masks for new images with a fine-tuned checkpoint.

images (a folder, searched recursively, or a dataset manifest) -> the evaluation loader's fixed
resize -> model -> COCO results -> ``predictions.json`` + ``images.json`` (image id -> file,
size) + ``stage.json``, and with ``overlays`` one PNG per image with the masks drawn on it.
Checkpoint keys: as ``stages.evaluate`` (``docs/evaluation.md``).
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console

from pipeline.atomic import write_bytes_atomic, write_json_atomic
from pipeline.coco_dataset import eval_loader
from pipeline.errors import InputError
from pipeline.images import ImageReadError, read_image_rgb
from pipeline.manifest import IMAGE_EXTENSIONS, Dataset, ImageRecord, load_manifest
from pipeline.overlays import render_results
from pipeline.run_record import now_iso, write_run_record
from pipeline.transforms import eval_config
from pipeline.engine.distributed import resolve_device
from pipeline.engine.progress import progress_mode
from pipeline.evaluation import load_inference_model, predict_results, report_unreadable
from stages.config import StageConfig
from stages.evaluate import PREDICTIONS_FILE

console = Console(stderr=True)

IMAGES_FILE = "images.json"
UNREADABLE_FILE = "unreadable.json"
OVERLAY_DIR = "overlays"
OVERLAY_ALPHA = 0.5


class PredictConfig(StageConfig):
    checkpoint: Path  # a checkpoint file, or a run folder (its checkpoints/latest is used)
    images: Path  # a folder of images (recursive) or a dataset manifest (.yaml / .yml)
    out: Path
    batch_size: int = 2
    short_side: int = 800
    max_long_side: int = 1333
    score_threshold: float = 0.5
    max_detections: int = 100
    overlays: bool = False
    device: str = "auto"
    num_workers: int = 0

    HASH_EXCLUDE = frozenset({"out", "device", "num_workers", "overlays"})


def images_dataset(path: Path) -> Dataset:
    """A manifest file (.yaml / .yml) loaded as is, or every image file under a folder
    (recursively, sorted by relative path; ids 1, 2, ... in that order)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return load_manifest(path)
    if not path.is_dir():
        raise InputError("give a folder of images or a manifest (.yaml) file", path)
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder", path)
    records = [ImageRecord(i + 1, name, path / name) for i, name in enumerate(names)]
    return Dataset(name=path.name, manifest_path=path, root=path, images=records)


def overlay_name(file_name: str) -> str:
    """``a/b/c.jpg`` -> ``a__b__c.png`` (one flat folder, no clashes between sub-folders)."""
    return Path(file_name).with_suffix(".png").as_posix().replace("/", "__")


def write_overlays(dataset: Dataset, results: list[dict], out_dir: Path,
                   skip: Iterable[int] = ()) -> int:
    """One overlay PNG per image of ``dataset`` (except the image ids in ``skip``) into
    ``out_dir``; returns how many."""
    by_image: dict[int, list[dict]] = defaultdict(list)
    for res in results:
        by_image[res["image_id"]].append(res)
    skipped = set(skip)
    records = [r for r in dataset.images if r.image_id not in skipped]
    for record in records:
        try:
            image = read_image_rgb(record.path)
        except ImageReadError as err:
            raise InputError(f"image cannot be read: {err}", record.path) from None
        canvas = render_results(image, by_image.get(record.image_id, []), OVERLAY_ALPHA)
        ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {record.path}")
        write_bytes_atomic(out_dir / overlay_name(record.file_name), png.tobytes())
    return len(records)


def run_predict(cfg: PredictConfig, progress: bool = True) -> dict:
    """Run the command; returns ``{"predictions": path, "images": path, "unreadable": path,
    "overlays": folder or None, "num_images": int, "num_unreadable": int,
    "num_predictions": int}``. Images that cannot be decoded do not stop the run: they are
    listed in ``unreadable.json`` (``num_images`` counts the images predicted)."""
    for name in ("batch_size", "max_detections", "short_side", "max_long_side"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    started = now_iso()
    t0 = time.perf_counter()
    dataset = images_dataset(cfg.images)
    device = resolve_device(cfg.device)
    loaded = load_inference_model(cfg.checkpoint, device)
    # the targets are not used: the dataset's own category map (if any) never fails
    loader = eval_loader(dataset, cfg.batch_size,
                         resize=eval_config(cfg.short_side, cfg.max_long_side),
                         num_workers=cfg.num_workers, pin_memory=torch.device(device).type == "cuda",
                         rank=0, world_size=1,
                         skip_unreadable=True)
    console.print(f"predict: {len(dataset.images)} images, checkpoint {loaded.checkpoint} "
                  f"(step {loaded.step}), device {device}")
    sizes: dict[int, tuple[int, int]] = {}
    unreadable: list[dict] = []
    results = predict_results(
        loaded.model, _record_sizes(loader.make_batches(0), sizes), loaded.category_ids,
        device=device, max_detections=cfg.max_detections, score_threshold=cfg.score_threshold,
        total=loader.batches_per_epoch(), progress=progress_mode(progress),
        unreadable=unreadable)
    if not sizes:
        raise InputError(f"none of the {len(unreadable)} images could be read (first: "
                         f"{unreadable[0]['file_name']}: {unreadable[0]['error']})", cfg.images)
    out = Path(cfg.out)
    write_json_atomic(out / PREDICTIONS_FILE, results)
    write_json_atomic(out / UNREADABLE_FILE, unreadable, indent=2)
    images = [{"id": r.image_id, "file_name": r.file_name, "height": sizes[r.image_id][0],
               "width": sizes[r.image_id][1]} for r in dataset.images if r.image_id in sizes]
    write_json_atomic(out / IMAGES_FILE, {
        "images": images, "categories": [{"id": c} for c in loaded.category_ids],
        "root": str(dataset.root.resolve()), "checkpoint": str(loaded.checkpoint.resolve())},
        indent=2)
    overlays = None
    if cfg.overlays:
        overlays = out / OVERLAY_DIR
        write_overlays(dataset, results, overlays, skip=(r["image_id"] for r in unreadable))
    summary = {"predictions": out / PREDICTIONS_FILE, "images": out / IMAGES_FILE,
               "unreadable": out / UNREADABLE_FILE, "overlays": overlays,
               "num_images": len(images), "num_unreadable": len(unreadable),
               "num_predictions": len(results)}
    write_run_record(
        out, stage="predict", config=cfg.resolved(), config_hash=cfg.config_hash(),
        inputs={"checkpoint": str(loaded.checkpoint), "images": str(cfg.images)},
        counts={"images": len(images), "images_unreadable": len(unreadable),
                "predictions": len(results),
                "seconds": round(time.perf_counter() - t0, 2)},
        started_at=started,
    )
    console.print(f"predict: {len(results)} instances with score > {cfg.score_threshold} in "
                  f"{len(images)} images -> {out / PREDICTIONS_FILE}"
                  + (f", overlays in {overlays}" if overlays else ""))
    report_unreadable(unreadable, len(dataset.images), "predict", out / UNREADABLE_FILE,
                      "no predictions for them")
    return summary


def _record_sizes(batches: Iterable[dict], sizes: dict[int, tuple[int, int]]
                  ) -> Iterator[dict]:
    """Pass ``batches`` through, noting each image's ``orig_sizes`` entry in ``sizes``."""
    for batch in batches:
        sizes.update(zip(batch["image_ids"], (tuple(s) for s in batch.get("orig_sizes", []))))
        yield batch
