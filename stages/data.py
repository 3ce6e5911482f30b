"""`uplvp data ...`: synthetic demo data, low-data splits, converters, manifest checks.

Each command: typed config (YAML + CLI overrides) -> pipeline call -> a record of the run.
"""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.coco import load_coco, write_coco
from pipeline.errors import InputError
from pipeline.manifest import load_manifest, write_manifest
from pipeline.run_record import now_iso, write_run_record
from pipeline.splits import format_percent, sample_subsets, split_file_stem, subset_coco
from stages.config import StageConfig

console = Console(stderr=True)


# --------------------------------------------------------------------------- synth


class SynthConfig(StageConfig):
    out: Path
    seed: int = 0
    num_unlabeled: int = 300
    num_train: int = 60
    num_val: int = 60
    image_size: int = 128


def run_synth(cfg: SynthConfig, progress: bool = True) -> dict:
    from pipeline.synth import write_synth_dataset

    for field in ("num_unlabeled", "num_train", "num_val"):
        if getattr(cfg, field) < 1:  # an empty split would give a manifest that cannot load
            raise InputError(f"--{field.replace('_', '-')} must be >= 1")
    started = now_iso()
    t0 = time.perf_counter()
    summary = write_synth_dataset(
        cfg.out,
        seed=cfg.seed,
        num_unlabeled=cfg.num_unlabeled,
        num_train=cfg.num_train,
        num_val=cfg.num_val,
        image_size=cfg.image_size,
        progress=progress,
    )
    write_run_record(
        cfg.out,
        stage="data synth",
        config=cfg.resolved(),
        config_hash=cfg.config_hash(),
        inputs={},
        counts=summary,
        started_at=started,
    )
    console.print(
        f"synthetic dataset written to {cfg.out} in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)))
    )
    return summary


# --------------------------------------------------------------------------- split


class SplitConfig(StageConfig):
    annotations: Path | None = None
    manifest: Path | None = None
    images_root: Path | None = None
    percent: list[float] = [1.0, 5.0, 10.0]
    seed: list[int] = [1]
    out: Path | None = None


def run_split(cfg: SplitConfig) -> list[Path]:
    """Write ``{stem}.{seed}@{percent}.json`` + ``.yaml`` manifest per (seed, percent)."""
    if (cfg.annotations is None) == (cfg.manifest is None):
        raise InputError("give exactly one of --annotations X.json or --manifest M.yaml")
    if cfg.manifest is not None:
        dataset = load_manifest(cfg.manifest)
        if not dataset.labeled:
            raise InputError("manifest has no annotations to split", cfg.manifest)
        ann_path = dataset.annotations_path
        coco = dataset.coco
        images_root = cfg.images_root or dataset.root
    else:
        ann_path = cfg.annotations
        coco = load_coco(ann_path)
        images_root = cfg.images_root
    assert ann_path is not None and coco is not None
    if images_root is not None and not Path(images_root).is_dir():
        raise InputError(f"--images-root: folder not found: {images_root}")
    out_dir = Path(cfg.out) if cfg.out is not None else Path(ann_path).parent
    started = now_iso()

    written: list[Path] = []
    table = Table(title=f"low-data splits of {Path(ann_path).name}")
    for col in ("seed", "percent", "images", "annotations", "file"):
        table.add_column(col)
    for seed in cfg.seed:
        for subset in sample_subsets([im["id"] for im in coco["images"]], cfg.percent, seed):
            stem = split_file_stem(Path(ann_path), seed, subset.percent)
            sub = subset_coco(coco, subset.image_ids)
            json_path = out_dir / f"{stem}.json"
            write_coco(json_path, sub)
            written.append(json_path)
            if images_root is not None:
                manifest_path = out_dir / f"{stem}.yaml"
                write_manifest(manifest_path, stem, images_root, annotations=json_path)
                written.append(manifest_path)
            table.add_row(
                str(seed),
                format_percent(subset.percent),
                str(len(sub["images"])),
                str(len(sub["annotations"])),
                json_path.name,
            )
    console.print(table)
    if images_root is None:
        console.print("no --images-root given: wrote COCO JSON only, no manifests")
    write_run_record(
        out_dir,
        stage="data split",
        config=cfg.resolved(),
        config_hash=cfg.config_hash(),
        inputs={"annotations": str(ann_path)},
        counts={"files": [p.name for p in written]},
        started_at=started,
        file_name=f"{Path(ann_path).stem}.split.json",
    )
    return written


# --------------------------------------------------------------------------- convert


class CityscapesConfig(StageConfig):
    root: Path
    split: str = "train"
    out: Path
    min_area: int = 0


class Ctw1500Config(StageConfig):
    images: Path
    labels: Path
    out: Path
    label_format: str = "auto"


def run_convert_cityscapes(cfg: CityscapesConfig, progress: bool = True) -> dict:
    from pipeline.converters.cityscapes import convert_cityscapes

    summary = convert_cityscapes(
        cfg.root, cfg.split, cfg.out, min_area=cfg.min_area, progress=progress
    )
    console.print(f"wrote {cfg.out}: " + _format_summary(summary))
    return summary


def run_convert_ctw1500(cfg: Ctw1500Config, progress: bool = True) -> dict:
    from pipeline.converters.ctw1500 import convert_ctw1500

    summary = convert_ctw1500(
        cfg.images, cfg.labels, cfg.out, label_format=cfg.label_format, progress=progress
    )
    console.print(f"wrote {cfg.out}: " + _format_summary(summary))
    return summary


# --------------------------------------------------------------------------- check


def run_check(manifest: Path) -> dict:
    """Validate a manifest (and its COCO file) and print what it holds."""
    dataset = load_manifest(manifest)
    info = {
        "name": dataset.name,
        "root": str(dataset.root),
        "images": len(dataset.images),
        "labeled": dataset.labeled,
    }
    if dataset.coco is not None:
        info["annotations"] = len(dataset.coco["annotations"])
        info["categories"] = len(dataset.categories)
    console.print(f"{manifest}: ok: " + _format_summary(info))
    return info


def _format_summary(summary: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)))
