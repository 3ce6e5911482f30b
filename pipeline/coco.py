"""COCO instances JSON: validated loading, atomic writing, polygon/RLE/mask conversion.

Masks are ``np.ndarray`` of dtype bool, shape (height, width). Polygons are COCO polygons: a list
of flat ``[x1, y1, x2, y2, ...]`` lists in pixel coordinates. RLE dicts are pycocotools RLE with
``counts`` as a str (compressed) so that they serialise to JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from pipeline.atomic import write_json_atomic
from pipeline.errors import InputError

_REQUIRED_TOP = ("images", "annotations", "categories")


# --------------------------------------------------------------------------- conversion


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (pycocotools' rasteriser, as COCOeval does) to a bool mask."""
    if not polygons:
        return np.zeros((height, width), dtype=bool)
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a bool mask as COCO polygons that pycocotools rasterises back to the
    same pixels (holes are not represented).

    OpenCV traces contours through pixel centres, which would lose half a pixel all round
    (-12 % area on a radius-8 disk). Tracing the mask upsampled 2x and mapping points back with
    ``(p + 0.5) / 2`` puts the outline a quarter pixel inside the pixel edges instead, which
    rasterises to exactly the traced pixels.
    """
    up = np.repeat(np.repeat(np.asarray(mask, dtype=np.uint8), 2, axis=0), 2, axis=1)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) < 3:
            continue
        polygons.append([(float(v) + 0.5) / 2 for v in contour.reshape(-1)])
    return polygons


def mask_to_rle(mask: np.ndarray) -> dict:
    """Bool mask -> compressed COCO RLE with ``counts`` as str (JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed str/bytes counts or uncompressed list counts) -> bool mask."""
    if isinstance(rle.get("counts"), list):
        h, w = rle["size"]
        rle = mask_utils.frPyObjects(rle, h, w)
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def annotation_to_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Decode an annotation's ``segmentation`` (polygons or RLE) to a bool (height, width) mask."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return polygons_to_mask(seg, height, width)
    return rle_to_mask(seg)


def ground_truth_rles(coco: dict) -> dict[int, list[tuple[int, float, dict]]]:
    """Non-crowd instances per image id: ``[(category_id, area, compressed RLE)]``."""
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    instances: dict[int, list[tuple[int, float, dict]]] = {i: [] for i in sizes}
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        height, width = sizes[ann["image_id"]]
        mask = annotation_to_mask(ann, height, width)
        rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
        instances[ann["image_id"]].append((ann["category_id"], float(ann["area"]), rle))
    return instances


def mask_bbox_xywh(mask: np.ndarray) -> list[float]:
    """Tight box ``[x, y, w, h]`` of a bool mask as pycocotools computes it (``toBbox``)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return [float(v) for v in mask_utils.toBbox(rle)]


# --------------------------------------------------------------------------- I/O


def write_coco(path: str | Path, coco: dict) -> None:
    """Write a COCO dict as JSON atomically (temporary file, then rename)."""
    write_json_atomic(path, coco)


def load_coco(path: str | Path) -> dict:
    """Load a COCO instances JSON and validate it; one :class:`InputError` line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError("COCO annotations file not found", path)
    try:
        with open(path, encoding="utf-8") as fh:
            coco = json.load(fh)
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON ({err.msg} at line {err.lineno})", path) from None
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file", path) from None
    validate_coco(coco, path)
    return coco


def validate_coco(coco: Any, path: str | Path) -> None:
    """Check the parts of a COCO instances dict that the stages rely on.

    Raises :class:`InputError` naming ``path`` and the offending field on the first problem.
    """
    if not isinstance(coco, dict):
        raise InputError("not a COCO instances file (top level is not an object)", path)
    for key in _REQUIRED_TOP:
        if key not in coco:
            raise InputError(f"not a COCO instances file (missing '{key}')", path)
    for key in _REQUIRED_TOP:
        if not isinstance(coco[key], list):
            raise InputError(f"'{key}' must be a list", path)

    cat_ids: set[int] = set()
    for i, cat in enumerate(coco["categories"]):
        where = f"categories[{i}]"
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise InputError(f"{where}.id must be an integer", path)
        if not isinstance(cat.get("name"), str):
            raise InputError(f"{where}.name must be a string", path)
        if cat["id"] in cat_ids:
            raise InputError(f"duplicate category id {cat['id']}", path)
        cat_ids.add(cat["id"])

    sizes: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(coco["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise InputError(f"{where}.id must be an integer", path)
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise InputError(f"{where}.file_name must be a non-empty string", path)
        for field in ("height", "width"):
            if not _is_int(img.get(field)) or img[field] <= 0:
                raise InputError(f"{where}.{field} must be a positive integer", path)
        if img["id"] in sizes:
            raise InputError(f"duplicate image id {img['id']}", path)
        sizes[img["id"]] = (img["height"], img["width"])

    ann_ids: set[int] = set()
    for i, ann in enumerate(coco["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise InputError(f"{where}.id must be an integer", path)
        if ann["id"] in ann_ids:
            raise InputError(f"duplicate annotation id {ann['id']}", path)
        ann_ids.add(ann["id"])
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in sizes:
            raise InputError(
                f"{where} (id {ann['id']}) points to missing image id {ann.get('image_id')!r}", path
            )
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in cat_ids:
            raise InputError(
                f"{where} (id {ann['id']}) has unknown category id {ann.get('category_id')!r}",
                path,
            )
        _validate_segmentation(ann.get("segmentation"), sizes[ann["image_id"]], where, path)
        bbox = ann.get("bbox")
        if bbox is not None and (
            not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox)
        ):
            raise InputError(f"{where}.bbox must be 4 numbers [x, y, w, h]", path)


def _validate_segmentation(seg: Any, size: tuple[int, int], where: str, path) -> None:
    if isinstance(seg, list):
        if not seg:
            raise InputError(f"{where}.segmentation is an empty polygon list", path)
        for j, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                raise InputError(f"{where}.segmentation[{j}] must be a list of numbers", path)
            if len(poly) % 2 or len(poly) < 6:
                raise InputError(
                    f"{where}.segmentation[{j}] needs an even count of >= 6 numbers "
                    f"(>= 3 points), got {len(poly)}",
                    path,
                )
    elif isinstance(seg, dict):
        rle_size = seg.get("size")
        if not isinstance(rle_size, list) or len(rle_size) != 2:
            raise InputError(f"{where}.segmentation RLE needs 'size' [height, width]", path)
        if tuple(rle_size) != tuple(size):
            raise InputError(
                f"{where}.segmentation RLE size {rle_size} != image size {list(size)}", path
            )
        if not isinstance(seg.get("counts"), (str, list)):
            raise InputError(f"{where}.segmentation RLE 'counts' must be a string or list", path)
    else:
        raise InputError(f"{where}.segmentation must be polygons (list) or RLE (object)", path)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
