"""SCUT-CTW1500 curved-text labels -> COCO instances JSON (one category, ``text``).

Two text label formats are read, one label file per image, one text region per line:

- ``curve`` (the original ``text_label_curve`` files): exactly 32 comma-separated numbers,
  ``xmin, ymin, xmax, ymax`` of the bounding rectangle then 14 ``(dx, dy)`` offsets; point i is
  ``(xmin + dx_i, ymin + dy_i)``.
- ``polygon`` (the test ground truth style): an even count of absolute coordinates
  ``x1, y1, ..., xn, yn``, optionally followed by ``,####transcription``. A transcription of
  ``###`` marks illegible "do not care" text, written as an ``iscrowd=1`` region.

``auto`` picks per file: ``polygon`` when a line has a ``####`` transcription or a count other
than 32, else ``curve``. Coordinates are pixel coordinates with (0, 0) the top-left image corner;
masks are rasterised by pycocotools, as COCOeval does.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.coco import write_coco
from pipeline.converters import image_size, progress_iter
from pipeline.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
LABEL_FORMATS = ("auto", "curve", "polygon")
CURVE_VALUES = 32
TRANSCRIPTION_MARK = "####"
DONT_CARE = "###"
TEXT_CATEGORY = {"id": 1, "name": "text", "supercategory": "text"}


@dataclass(frozen=True)
class TextRegion:
    """One labelled text region.

    ``points`` is a float64 (N, 2) array of absolute (x, y) pixel coordinates, in label order;
    ``transcription`` is the text after ``####`` (``None`` when the line had none);
    ``line`` is the 1-based line number in the label file.
    """

    points: np.ndarray
    transcription: str | None
    line: int

    @property
    def dont_care(self) -> bool:
        return self.transcription == DONT_CARE


def convert_ctw1500(
    images_dir: Path,
    labels_dir: Path,
    out_json: Path,
    label_format: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Convert CTW1500 images and text label files to a COCO instances JSON.

    Args:
        images_dir: folder of images (``.jpg/.jpeg/.png/.bmp``, not searched recursively).
            ``file_name`` in the output is relative to it (the bare file name).
        labels_dir: folder of ``.txt`` label files. Image ``1001.jpg`` takes ``1001.txt``,
            ``gt_1001.txt`` or a zero-padded variant such as ``0001001.txt`` (numeric names are
            matched by value); exactly one must exist.
        out_json: where the COCO JSON is written (atomically).
        label_format: ``auto``, ``curve`` or ``polygon`` (see the module docstring).
        progress: show a progress bar.

    Returns:
        Summary: ``images``, ``annotations``, ``text_instances``, ``dont_care`` (``###``
        regions, written as ``iscrowd=1``), ``skipped_too_few_points`` (< 3 points),
        ``skipped_degenerate`` (polygons that cover no pixel), ``label_formats`` (resolved
        format -> file count, ``empty`` for files without regions), ``unmatched_label_files``
        (label files no image uses), ``out_json``.

    Raises:
        InputError: missing folders, no images or label files, an image without a label file,
            a line with a non-numeric field or an odd coordinate count (file and line named),
            an unreadable image.
    """
    _check_format(label_format)
    pairs, unmatched = match_label_files(Path(images_dir), Path(labels_dir))

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    formats: Counter[str] = Counter()
    skipped = Counter({"too_few_points": 0, "degenerate": 0})
    for image_id, (image_path, label_path) in enumerate(
        progress_iter(pairs, "CTW1500", progress), start=1
    ):
        height, width = image_size(image_path)
        images.append({"id": image_id, "file_name": image_path.name,
                       "height": height, "width": width})
        resolved, regions = parse_label_file(label_path, label_format)
        formats[resolved if regions else "empty"] += 1
        for region in regions:
            if len(region.points) < 3:
                skipped["too_few_points"] += 1
                continue
            ann = region_annotation(region, height, width)
            if ann is None:
                skipped["degenerate"] += 1
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})

    coco = {
        "info": {
            "description": "SCUT-CTW1500 text instances, converted by uplvp",
            "image_root": str(images_dir),
        },
        "images": images,
        "annotations": annotations,
        "categories": [dict(TEXT_CATEGORY)],
    }
    write_coco(out_json, coco)

    dont_care = sum(ann["iscrowd"] for ann in annotations)
    return {
        "images": len(images),
        "annotations": len(annotations),
        "text_instances": len(annotations) - dont_care,
        "dont_care": dont_care,
        "skipped_too_few_points": skipped["too_few_points"],
        "skipped_degenerate": skipped["degenerate"],
        "label_formats": dict(sorted(formats.items())),
        "unmatched_label_files": unmatched,
        "out_json": str(out_json),
    }


def match_label_files(images_dir: Path, labels_dir: Path) -> tuple[list[tuple[Path, Path]], int]:
    """Pair every image with its label file.

    Returns the ``(image, label)`` pairs sorted by image file name, and the number of label
    files that no image uses. Raises :class:`InputError` for a missing folder, no images, no
    label files, an image without a label file, or a name matched by several files.
    """
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise InputError("folder not found", folder)
    image_paths = sorted(
        p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not image_paths:
        raise InputError(f"no images ({'/'.join(IMAGE_EXTENSIONS)})", images_dir)
    label_paths = sorted(p for p in labels_dir.glob("*.txt") if p.is_file())
    if not label_paths:
        raise InputError("no .txt label files", labels_dir)

    labels_by_key: dict[str, list[Path]] = {}
    for label in label_paths:
        labels_by_key.setdefault(_match_key(label.stem), []).append(label)

    pairs = []
    image_by_key: dict[str, Path] = {}
    for image in image_paths:
        key = _match_key(image.stem)
        if key in image_by_key:
            raise InputError(f"images {image_by_key[key].name} and {image.name} match the same "
                             "label file name", images_dir)
        image_by_key[key] = image
        candidates = labels_by_key.get(key, [])
        if not candidates:
            raise InputError(f"image has no label file in {labels_dir} (looked for "
                             f"{image.stem}.txt, gt_{image.stem}.txt or a zero-padded name)",
                             image)
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise InputError(f"image matches several label files: {names}", image)
        pairs.append((image, candidates[0]))
    unmatched = sum(len(v) for k, v in labels_by_key.items() if k not in image_by_key)
    return pairs, unmatched


def _match_key(stem: str) -> str:
    """Name shared by an image and its label file: ``gt_`` dropped, numeric names by value."""
    stem = stem.removeprefix("gt_")
    return str(int(stem)) if stem.isascii() and stem.isdigit() else stem


def parse_label_file(path: Path, label_format: str = "auto") -> tuple[str, list[TextRegion]]:
    """Read one CTW1500 label file.

    Returns the resolved format (``curve`` or ``polygon``; ``label_format`` itself when it is
    not ``auto``) and the regions in line order. Blank lines are ignored. Raises
    :class:`InputError` naming the file and line for a non-numeric field, an odd coordinate
    count, a line that does not fit an explicitly requested ``curve`` format, or an unknown
    ``label_format``.
    """
    _check_format(label_format)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("label file is not UTF-8 text", path) from None
    lines = [
        (lineno, *_parse_line(path, lineno, raw))
        for lineno, raw in enumerate(text.splitlines(), start=1)
        if raw.strip()
    ]
    resolved = label_format
    if label_format == "auto":
        looks_curve = all(len(v) == CURVE_VALUES and t is None for _, v, t in lines)
        resolved = "curve" if looks_curve else "polygon"
    regions = []
    for lineno, values, transcription in lines:
        if resolved == "curve":
            points = _curve_points(path, lineno, values, transcription)
        else:
            points = np.asarray(values, dtype=np.float64).reshape(-1, 2)
        regions.append(TextRegion(points, transcription, lineno))
    return resolved, regions


def _check_format(label_format: str) -> None:
    if label_format not in LABEL_FORMATS:
        raise InputError(f"label_format must be one of {', '.join(LABEL_FORMATS)}, "
                         f"got {label_format!r}")


def _parse_line(path: Path, lineno: int, raw: str) -> tuple[list[float], str | None]:
    """Split one label line into its numbers and its ``####`` transcription (or ``None``)."""
    coords, mark, transcription = raw.strip().partition(TRANSCRIPTION_MARK)
    fields = coords.strip().removesuffix(",").split(",")
    values = []
    for k, field in enumerate(fields, start=1):
        try:
            value = float(field)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise InputError(f"line {lineno}: field {k} {field.strip()!r} is not a number", path)
        values.append(value)
    if len(values) % 2:
        raise InputError(f"line {lineno}: odd count of coordinates ({len(values)} numbers)", path)
    return values, (transcription if mark else None)


def _curve_points(path: Path, lineno: int, values: list[float], transcription: str | None
                  ) -> np.ndarray:
    """Original curve line -> (14, 2) absolute points (offsets added to ``xmin, ymin``)."""
    if len(values) != CURVE_VALUES or transcription is not None:
        raise InputError(f"line {lineno}: curve format needs exactly {CURVE_VALUES} numbers and "
                         f"no transcription, got {len(values)} numbers"
                         f"{' and a transcription' if transcription is not None else ''}", path)
    xmin, ymin, xmax, ymax = values[:4]
    if xmax < xmin or ymax < ymin:
        raise InputError(f"line {lineno}: curve box has xmax < xmin or ymax < ymin (for absolute "
                         "polygons use label format 'polygon')", path)
    return np.asarray(values[4:], dtype=np.float64).reshape(-1, 2) + (xmin, ymin)


def region_annotation(region: TextRegion, height: int, width: int) -> dict[str, Any] | None:
    """COCO annotation (without ``id``/``image_id``) for a region with >= 3 points.

    Area and bbox are those of the pycocotools rasterisation of the polygon on a
    (height, width) image. A readable region is a polygon segmentation; a ``###`` region is an
    ``iscrowd=1`` RLE. Returns ``None`` when the polygon covers no pixel (degenerate).
    """
    flat = [float(v) for v in region.points.reshape(-1)]
    rle = mask_utils.frPyObjects([flat], height, width)[0]
    area = int(mask_utils.area(rle))
    if area == 0:
        return None
    ann: dict[str, Any] = {
        "category_id": TEXT_CATEGORY["id"],
        "segmentation": [flat],
        "area": area,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }
    if region.dont_care:
        ann["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        ann["iscrowd"] = 1
    if region.transcription is not None:
        ann["text"] = region.transcription
    return ann
