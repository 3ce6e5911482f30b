"""Seeded image-level low-data subsets of a COCO instances file.

Convention of semi-supervised COCO: ``instances_train2017.{seed}@{percent}.json``. One seeded
permutation of the (sorted) image ids is drawn per seed and each percentage takes its prefix, so
for one seed the 1% subset is contained in the 5% subset, which is contained in the 10% subset.
The same seed always gives the same subsets, whatever other percentages are asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import InputError


@dataclass(frozen=True)
class Subset:
    percent: float
    seed: int
    image_ids: list[int]


def format_percent(percent: float) -> str:
    """``1.0 -> '1'``, ``0.5 -> '0.5'`` (as in ``instances_train2017.1@0.5``)."""
    return f"{percent:g}"


def subset_size(num_images: int, percent: float) -> int:
    """Images kept for ``percent`` of ``num_images``: rounded half up, at least 1."""
    return max(1, min(num_images, math.floor(num_images * percent / 100.0 + 0.5)))


def sample_subsets(image_ids: list[int], percents: list[float], seed: int) -> list[Subset]:
    """Seeded nested subsets; ids in each subset are returned sorted."""
    if not image_ids:
        raise InputError("no images to split")
    for p in percents:
        if not (0 < p <= 100):
            raise InputError(f"--percent {format_percent(p)}: must be in (0, 100]")
    order = np.random.default_rng(seed).permutation(np.asarray(sorted(image_ids), dtype=np.int64))
    return [
        Subset(p, seed, sorted(int(i) for i in order[: subset_size(len(order), p)]))
        for p in percents
    ]


def subset_coco(coco: dict, image_ids: list[int]) -> dict:
    """COCO dict restricted to ``image_ids`` (their annotations; all categories kept)."""
    keep = set(image_ids)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = [im for im in coco["images"] if im["id"] in keep]
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    return out


def split_file_stem(annotations: Path, seed: int, percent: float) -> str:
    return f"{annotations.stem}.{seed}@{format_percent(percent)}"
