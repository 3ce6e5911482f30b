"""Cityscapes ``gtFine`` instance labels -> COCO instances JSON.

Input layout (the official download, unpacked into one root folder)::

    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_instanceIds.png
    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png

An ``instanceIds`` PNG is a single-channel integer image (16-bit in the official release), one
value ``v`` per pixel: ``v >= 1000`` is instance ``v % 1000`` of label id ``v // 1000``;
``v < 1000`` is a bare label id, which for an instance class marks a crowd (group) region.

Output: the 8 Cityscapes instance classes as COCO categories 1..8, one annotation per instance
and one ``iscrowd=1`` annotation per (image, class) crowd region, every segmentation a compressed
COCO RLE (exact pixel masks; see ``docs/converters.md``). ``file_name`` is relative to ``root``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from pipeline.coco import mask_to_rle, write_coco
from pipeline.converters import image_size, progress_iter
from pipeline.errors import InputError

LABEL_SUFFIX = "_gtFine_instanceIds.png"
IMAGE_SUFFIX = "_leftImg8bit.png"

# Cityscapes label id -> (COCO category id, name, supercategory), in the official label order.
CATEGORIES: dict[int, tuple[int, str, str]] = {
    24: (1, "person", "human"),
    25: (2, "rider", "human"),
    26: (3, "car", "vehicle"),
    27: (4, "truck", "vehicle"),
    28: (5, "bus", "vehicle"),
    31: (6, "train", "vehicle"),
    32: (7, "motorcycle", "vehicle"),
    33: (8, "bicycle", "vehicle"),
}


def convert_cityscapes(
    root: Path,
    split: str,
    out_json: Path,
    min_area: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert one Cityscapes split's fine instance labels to a COCO instances JSON.

    Args:
        root: Cityscapes root folder holding ``gtFine/`` and ``leftImg8bit/``.
        split: split folder name (``train``, ``val``, ``test``).
        out_json: where the COCO JSON is written (atomically).
        min_area: instances (not crowd regions) with fewer pixels than this are skipped and
            counted in ``skipped_small``; 0 keeps all.
        progress: show a progress bar.

    Returns:
        Summary: ``images``, ``annotations``, ``instances``, ``crowd_regions``,
        ``skipped_small``, ``ignored_other_instances`` (instances of classes outside the 8,
        e.g. caravan/trailer), ``per_category`` (name -> kept instances), ``out_json``.

    Raises:
        InputError: missing folders, no label files, a label without its image or an image
            without its label, an unreadable or wrongly shaped ``instanceIds`` PNG.
    """
    root = Path(root)
    if min_area < 0:
        raise InputError(f"min_area must be >= 0, got {min_area}")
    pairs = _find_pairs(root, split)

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    counts = {"skipped_small": 0, "ignored_other_instances": 0}
    for image_id, (label_path, image_path) in enumerate(
        progress_iter(pairs, f"Cityscapes {split}", progress), start=1
    ):
        height, width = image_size(image_path)
        ids = _read_instance_ids(label_path, (height, width))
        images.append({
            "id": image_id,
            "file_name": image_path.relative_to(root).as_posix(),
            "height": height,
            "width": width,
        })
        for ann in _image_annotations(ids, min_area, counts):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})

    coco = {
        "info": {
            "description": f"Cityscapes gtFine {split} instances, converted by uplvp",
            "image_root": "the Cityscapes root folder (file_name starts with leftImg8bit/)",
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cat_id, "name": name, "supercategory": sup}
            for cat_id, name, sup in CATEGORIES.values()
        ],
    }
    write_coco(out_json, coco)

    names = {cat_id: name for cat_id, name, _ in CATEGORIES.values()}
    per_category = {name: 0 for name in names.values()}
    for ann in annotations:
        if not ann["iscrowd"]:
            per_category[names[ann["category_id"]]] += 1
    crowd = sum(ann["iscrowd"] for ann in annotations)
    return {
        "images": len(images),
        "annotations": len(annotations),
        "instances": len(annotations) - crowd,
        "crowd_regions": crowd,
        **counts,
        "per_category": per_category,
        "out_json": str(out_json),
    }


def _find_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Sorted ``(instanceIds PNG, leftImg8bit PNG)`` pairs of one split; every file paired."""
    label_dir = root / "gtFine" / split
    image_dir = root / "leftImg8bit" / split
    for folder in (root, label_dir, image_dir):
        if not folder.is_dir():
            raise InputError("Cityscapes folder not found", folder)

    labels = sorted(label_dir.glob(f"*/*{LABEL_SUFFIX}"))
    if not labels:
        raise InputError(f"no */*{LABEL_SUFFIX} label files", label_dir)
    pairs = []
    for label in labels:
        stem = label.name[: -len(LABEL_SUFFIX)]
        image = image_dir / label.parent.name / f"{stem}{IMAGE_SUFFIX}"
        if not image.is_file():
            raise InputError(f"label file has no image (expected {image})", label)
        pairs.append((label, image))

    labelled = {image for _, image in pairs}
    for image in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        if image not in labelled:
            raise InputError(f"image has no {LABEL_SUFFIX} label file", image)
    return pairs


def _read_instance_ids(path: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """Read an ``instanceIds`` PNG as an int64 (H, W) array, checked against the image size.

    The array is Fortran-ordered so that per-value masks RLE-encode without a copy.
    """
    ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if ids is None:
        raise InputError("cannot read instanceIds PNG", path)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(
            f"instanceIds PNG must be single-channel integer, got shape {ids.shape} {ids.dtype}",
            path,
        )
    if ids.dtype == np.uint8:
        raise InputError(
            "instanceIds PNG is 8-bit and cannot hold instance ids >= 1000 "
            "(is this a labelIds file?)",
            path,
        )
    if ids.shape != image_hw:
        raise InputError(
            f"instanceIds size {ids.shape[1]}x{ids.shape[0]} differs from its image "
            f"{image_hw[1]}x{image_hw[0]} (width x height)",
            path,
        )
    return np.asfortranarray(ids, dtype=np.int64)


def _image_annotations(
    ids: np.ndarray, min_area: int, counts: dict[str, int]
) -> list[dict[str, Any]]:
    """Annotations (without ``id``/``image_id``) for one ``instanceIds`` array.

    ``ids`` is (H, W) int64 as described in the module docstring. One annotation per kept
    pixel value, in increasing value order (so crowd regions, values < 1000, come first): an
    instance value gives its instance mask, a bare instance-class label id gives that class's
    crowd region. ``counts`` is updated in place with skipped/ignored instances.
    """
    values, areas = np.unique(ids, return_counts=True)
    annotations = []
    for value, area in zip(values.tolist(), areas.tolist()):
        is_instance = value >= 1000
        label_id = value // 1000 if is_instance else value
        if label_id not in CATEGORIES:
            counts["ignored_other_instances"] += int(is_instance)
            continue
        if is_instance and area < min_area:
            counts["skipped_small"] += 1
            continue
        rle = mask_to_rle(ids == value)
        annotations.append({
            "category_id": CATEGORIES[label_id][0],
            "segmentation": rle,
            "area": int(area),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0 if is_instance else 1,
        })
    return annotations
