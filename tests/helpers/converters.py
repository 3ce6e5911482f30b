"""Cityscapes and CTW1500 inputs in their real formats, hand-drawn with known instances."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

# --------------------------------------------------------------------------- helpers

H, W = 12, 16  # Cityscapes fixture size (rows, cols)


def rect_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Bool (h, w) mask, True on rows y0..y1-1 and columns x0..x1-1."""
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def write_gray_image(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w, 3), 127, dtype=np.uint8))


def masks_by_category(coco: COCO, image_id: int) -> dict[tuple[int, int], list[np.ndarray]]:
    """(category_id, iscrowd) -> decoded masks of one image."""
    out: dict[tuple[int, int], list[np.ndarray]] = {}
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        out.setdefault((ann["category_id"], ann["iscrowd"]), []).append(
            coco.annToMask(ann).astype(bool))
    return out


# --------------------------------------------------------------------------- Cityscapes


def cityscapes_ids() -> dict[str, np.ndarray]:
    """Hand-drawn instanceIds arrays (uint16, H x W), by '{city}/{city}_{seq}_{frame}'."""
    a = np.full((H, W), 7, dtype=np.uint16)              # road, no instances
    a[1:4, 2:6] = 24001                                  # person #1: 3x4 = 12 px
    a[5:7, 0:2] = 24002                                  # person #2: 2x2 = 4 px
    a[8:11, 10:15] = 26000                               # car #0: 3x5 = 15 px
    a[0:2, 12:14] = 24                                   # person crowd: 2x2 = 4 px
    a[10:11, 0:2] = 29001                                # caravan: not one of the 8 classes
    a[11, 15] = 33000                                    # bicycle #0: 1 px
    b = np.full((H, W), 0, dtype=np.uint16)
    b[0:6, 0:8] = 28000                                  # bus: 48 px
    b[6:12, 8:16] = 31005                                # train: 48 px
    c = np.full((H, W), 7, dtype=np.uint16)              # an image without any instance
    return {
        "aachen/aachen_000000_000019": a,
        "aachen/aachen_000001_000019": c,
        "bochum/bochum_000000_000313": b,
    }


def make_cityscapes(root: Path, split: str = "train") -> dict[str, np.ndarray]:
    ids = cityscapes_ids()
    for name, arr in ids.items():
        label = root / "gtFine" / split / f"{name}_gtFine_instanceIds.png"
        label.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(label), arr)
        write_gray_image(root / "leftImg8bit" / split / f"{name}_leftImg8bit.png", H, W)
    return ids


# --------------------------------------------------------------------------- CTW1500

CH, CW = 20, 30  # CTW1500 fixture size (rows, cols)

# Curve format: box (2, 3)-(12, 8) and 14 offsets tracing its outline (7 on top, 7 below).
CURVE_RECT = [2, 3, 12, 8] + [v for x in (0, 1, 3, 5, 7, 9, 10) for v in (x, 0)] \
    + [v for x in (10, 9, 7, 5, 3, 1, 0) for v in (x, 5)]
# All 14 offsets on one row: a zero-area polygon.
CURVE_FLAT = [0, 0, 13, 0] + [v for x in range(14) for v in (x, 0)]


def csv_line(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def make_ctw(root: Path) -> tuple[Path, Path]:
    images, labels = root / "images", root / "labels"
    labels.mkdir(parents=True)
    write_gray_image(images / "0001.jpg", CH, CW)
    write_gray_image(images / "1001.jpg", CH, CW)
    write_gray_image(images / "1002.png", CH, CW)
    write_gray_image(images / "1003.jpg", CH, CW)
    (labels / "0001.txt").write_text(f"{csv_line(CURVE_RECT)}\n{csv_line(CURVE_FLAT)}\n")
    (labels / "0001001.txt").write_text(
        "1,1,6,1,6,4,1,4,####Hello, world\n"
        "20,2,28,2,28,10,20,10,#######\n"
        "\n"
        "3,3,5,5,####ab\n")
    (labels / "gt_1002.txt").write_text("0,10,4,10,4,12,2,12,2,14,0,14\n")
    (labels / "1003.txt").write_text("")
    (labels / "9999.txt").write_text("1,1,2,1,2,2\n")  # no image uses it
    return images, labels
