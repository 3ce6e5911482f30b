"""Cityscapes and CTW1500 converters on tiny hand-made fixtures in the real formats."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from pipeline.coco import load_coco
from pipeline.converters.cityscapes import convert_cityscapes
from pipeline.converters.ctw1500 import convert_ctw1500, parse_label_file
from pipeline.errors import InputError
from tests.helpers.converters import (
    H,
    W,
    CH,
    CW,
    rect_mask,
    write_gray_image,
    masks_by_category,
    make_cityscapes,
    CURVE_RECT,
    csv_line,
    make_ctw,
)

def test_cityscapes_instances_crowd_and_categories(tmp_path):
    make_cityscapes(tmp_path / "cs")
    out = tmp_path / "out" / "train.json"
    summary = convert_cityscapes(tmp_path / "cs", "train", out, progress=False)

    assert summary == {
        "images": 3, "annotations": 7, "instances": 6, "crowd_regions": 1,
        "skipped_small": 0, "ignored_other_instances": 1,
        "per_category": {"person": 2, "rider": 0, "car": 1, "truck": 0, "bus": 1, "train": 1,
                         "motorcycle": 0, "bicycle": 1},
        "out_json": str(out),
    }
    load_coco(out)  # passes the project's COCO validation
    coco = COCO(str(out))
    cats = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in cats] == [
        (1, "person"), (2, "rider"), (3, "car"), (4, "truck"), (5, "bus"), (6, "train"),
        (7, "motorcycle"), (8, "bicycle")]

    images = {img["file_name"]: img for img in coco.loadImgs(coco.getImgIds())}
    assert sorted(images) == [
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png",
        "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png",
    ]
    assert all((img["height"], img["width"]) == (H, W) for img in images.values())

    first = images["leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"]["id"]
    masks = masks_by_category(coco, first)
    assert set(masks) == {(1, 0), (1, 1), (3, 0), (8, 0)}
    persons = sorted(masks[(1, 0)], key=lambda m: -int(m.sum()))
    assert np.array_equal(persons[0], rect_mask(H, W, 1, 4, 2, 6))
    assert np.array_equal(persons[1], rect_mask(H, W, 5, 7, 0, 2))
    assert np.array_equal(masks[(1, 1)][0], rect_mask(H, W, 0, 2, 12, 14))
    assert np.array_equal(masks[(3, 0)][0], rect_mask(H, W, 8, 11, 10, 15))
    assert np.array_equal(masks[(8, 0)][0], rect_mask(H, W, 11, 12, 15, 16))

    anns = coco.loadAnns(coco.getAnnIds(imgIds=[first]))  # pixel-value order
    assert [(a["category_id"], a["iscrowd"], a["area"], a["bbox"]) for a in anns] == [
        (1, 1, 4, [12.0, 0.0, 2.0, 2.0]),   # crowd, value 24
        (1, 0, 12, [2.0, 1.0, 4.0, 3.0]),   # 24001
        (1, 0, 4, [0.0, 5.0, 2.0, 2.0]),    # 24002
        (3, 0, 15, [10.0, 8.0, 5.0, 3.0]),  # 26000
        (8, 0, 1, [15.0, 11.0, 1.0, 1.0]),  # 33000
    ]
    assert all(isinstance(a["segmentation"], dict) for a in anns)  # RLE

    second = images["leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png"]["id"]
    masks = masks_by_category(coco, second)
    assert np.array_equal(masks[(5, 0)][0], rect_mask(H, W, 0, 6, 0, 8))
    assert np.array_equal(masks[(6, 0)][0], rect_mask(H, W, 6, 12, 8, 16))
    empty = images["leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png"]["id"]
    assert coco.getAnnIds(imgIds=[empty]) == []


def test_cityscapes_min_area_skips_small_instances_not_crowd(tmp_path):
    make_cityscapes(tmp_path)
    out = tmp_path / "val.json"
    summary = convert_cityscapes(tmp_path, "train", out, min_area=5, progress=False)
    # person #2 (4 px) and the bicycle (1 px) go; the 4 px crowd region stays.
    assert summary["skipped_small"] == 2
    assert (summary["instances"], summary["crowd_regions"]) == (4, 1)
    coco = COCO(str(out))
    areas = sorted(a["area"] for a in coco.loadAnns(coco.getAnnIds()))
    assert areas == [4, 12, 15, 48, 48]


def test_cityscapes_output_is_deterministic(tmp_path):
    make_cityscapes(tmp_path)
    convert_cityscapes(tmp_path, "train", tmp_path / "a.json", progress=True)
    convert_cityscapes(tmp_path, "train", tmp_path / "b.json", progress=False)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_cityscapes_size_mismatch_names_the_label_file(tmp_path):
    make_cityscapes(tmp_path)
    image = tmp_path / "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png"
    write_gray_image(image, H, W + 1)
    with pytest.raises(InputError, match=r"bochum_000000_000313_gtFine_instanceIds\.png: "
                                         r"instanceIds size 16x12 differs from its image 17x12"):
        convert_cityscapes(tmp_path, "train", tmp_path / "o.json", progress=False)


def test_cityscapes_image_without_label(tmp_path):
    make_cityscapes(tmp_path)
    write_gray_image(tmp_path / "leftImg8bit/train/bochum/bochum_000009_000001_leftImg8bit.png", H, W)
    with pytest.raises(InputError, match=r"bochum_000009_000001_leftImg8bit\.png: image has no"):
        convert_cityscapes(tmp_path, "train", tmp_path / "o.json", progress=False)


def test_cityscapes_label_without_image(tmp_path):
    make_cityscapes(tmp_path)
    (tmp_path / "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png").unlink()
    with pytest.raises(InputError, match=r"aachen_000001_000019_gtFine_instanceIds\.png: "
                                         r"label file has no image"):
        convert_cityscapes(tmp_path, "train", tmp_path / "o.json", progress=False)


def test_cityscapes_missing_split_and_empty_split(tmp_path):
    make_cityscapes(tmp_path)
    with pytest.raises(InputError, match=r"gtFine/val: Cityscapes folder not found"):
        convert_cityscapes(tmp_path, "val", tmp_path / "o.json", progress=False)
    (tmp_path / "gtFine/test").mkdir()
    (tmp_path / "leftImg8bit/test").mkdir()
    with pytest.raises(InputError, match=r"gtFine/test: no \*/\*_gtFine_instanceIds\.png"):
        convert_cityscapes(tmp_path, "test", tmp_path / "o.json", progress=False)
    assert not (tmp_path / "o.json").exists()


def test_cityscapes_rejects_8bit_label_png(tmp_path):
    make_cityscapes(tmp_path)
    label = tmp_path / "gtFine/train/bochum/bochum_000000_000313_gtFine_instanceIds.png"
    assert cv2.imwrite(str(label), np.full((H, W), 7, dtype=np.uint8))
    with pytest.raises(InputError, match=r"instanceIds PNG is 8-bit"):
        convert_cityscapes(tmp_path, "train", tmp_path / "o.json", progress=False)


# --------------------------------------------------------------------------- CTW1500

def test_ctw1500_both_formats_masks_and_counts(tmp_path):
    images, labels = make_ctw(tmp_path)
    out = tmp_path / "ctw.json"
    summary = convert_ctw1500(images, labels, out, progress=False)
    assert summary == {
        "images": 4, "annotations": 4, "text_instances": 3, "dont_care": 1,
        "skipped_too_few_points": 1, "skipped_degenerate": 1,
        "label_formats": {"curve": 1, "empty": 1, "polygon": 2},
        "unmatched_label_files": 1, "out_json": str(out),
    }
    load_coco(out)  # passes the project's COCO validation
    coco = COCO(str(out))
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [(1, "text")]
    by_name = {img["file_name"]: img for img in coco.loadImgs(coco.getImgIds())}
    assert sorted(by_name) == ["0001.jpg", "1001.jpg", "1002.png", "1003.jpg"]
    assert all((img["height"], img["width"]) == (CH, CW) for img in by_name.values())

    curve = coco.loadAnns(coco.getAnnIds(imgIds=[by_name["0001.jpg"]["id"]]))
    assert len(curve) == 1
    assert np.array_equal(coco.annToMask(curve[0]).astype(bool), rect_mask(CH, CW, 3, 8, 2, 12))
    assert curve[0]["area"] == 50 and curve[0]["bbox"] == [2.0, 3.0, 10.0, 5.0]
    assert curve[0]["segmentation"][0][:4] == [2.0, 3.0, 3.0, 3.0]

    anns = coco.loadAnns(coco.getAnnIds(imgIds=[by_name["1001.jpg"]["id"]]))
    assert [(a["iscrowd"], a["text"], a["area"]) for a in anns] == [
        (0, "Hello, world", 15), (1, "###", 64)]
    assert np.array_equal(coco.annToMask(anns[0]).astype(bool), rect_mask(CH, CW, 1, 4, 1, 6))
    assert isinstance(anns[1]["segmentation"], dict)
    assert np.array_equal(coco.annToMask(anns[1]).astype(bool), rect_mask(CH, CW, 2, 10, 20, 28))

    (ell,) = coco.loadAnns(coco.getAnnIds(imgIds=[by_name["1002.png"]["id"]]))
    expected = rect_mask(CH, CW, 10, 12, 0, 4) | rect_mask(CH, CW, 12, 14, 0, 2)
    assert np.array_equal(coco.annToMask(ell).astype(bool), expected)
    assert ell["area"] == 12 and "text" not in ell
    assert coco.getAnnIds(imgIds=[by_name["1003.jpg"]["id"]]) == []


def test_ctw1500_explicit_polygon_format_for_32_numbers(tmp_path):
    # A 16-point absolute rectangle (5, 2)-(13, 6) has 32 numbers: 'auto' would read it as curve.
    top = [v for x in range(5, 13) for v in (x, 2)]
    bottom = [v for x in range(13, 5, -1) for v in (x, 6)]
    label = tmp_path / "a.txt"
    label.write_text(csv_line(top + bottom) + "\n")
    fmt, regions = parse_label_file(label, "polygon")
    assert fmt == "polygon" and len(regions) == 1 and regions[0].points.shape == (16, 2)
    assert regions[0].line == 1 and regions[0].transcription is None
    fmt, regions = parse_label_file(label, "auto")
    assert fmt == "curve" and regions[0].points.shape == (14, 2)


@pytest.mark.parametrize("content, message", [
    ("1,1,6,1,6,4\n1,2,abc,4,5,6\n", r"bad\.txt: line 2: field 3 'abc' is not a number"),
    ("1,2,3,4,5\n", r"bad\.txt: line 1: odd count of coordinates \(5 numbers\)"),
    ("1,2,nan,4,5,6,####x\n", r"bad\.txt: line 1: field 3 'nan' is not a number"),
    ("1,2,3,4,5,6\n", None),
])
def test_ctw1500_bad_lines_name_file_and_line(tmp_path, content, message):
    label = tmp_path / "bad.txt"
    label.write_text(content)
    if message is None:
        with pytest.raises(InputError, match=r"bad\.txt: line 1: curve format needs exactly 32"):
            parse_label_file(label, "curve")
    else:
        with pytest.raises(InputError, match=message):
            parse_label_file(label, "auto")


def test_ctw1500_curve_box_inverted(tmp_path):
    label = tmp_path / "c.txt"
    label.write_text(csv_line([12, 3, 2, 8] + CURVE_RECT[4:]) + "\n")
    with pytest.raises(InputError, match=r"c\.txt: line 1: curve box has xmax < xmin"):
        parse_label_file(label, "auto")


def test_ctw1500_image_without_label_file(tmp_path):
    images, labels = make_ctw(tmp_path)
    (labels / "gt_1002.txt").unlink()
    with pytest.raises(InputError, match=r"1002\.png: image has no label file"):
        convert_ctw1500(images, labels, tmp_path / "o.json", progress=False)
    assert not (tmp_path / "o.json").exists()


def test_ctw1500_ambiguous_label_files(tmp_path):
    images, labels = make_ctw(tmp_path)
    (labels / "1002.txt").write_text("")
    with pytest.raises(InputError, match=r"1002\.png: image matches several label files: "
                                         r"1002\.txt, gt_1002\.txt"):
        convert_ctw1500(images, labels, tmp_path / "o.json", progress=False)


def test_ctw1500_missing_folders_and_no_labels(tmp_path):
    images, labels = make_ctw(tmp_path)
    with pytest.raises(InputError, match=r"nope: folder not found"):
        convert_ctw1500(images, tmp_path / "nope", tmp_path / "o.json", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"empty: no \.txt label files"):
        convert_ctw1500(images, empty, tmp_path / "o.json", progress=False)
    with pytest.raises(InputError, match=r"empty: no images"):
        convert_ctw1500(empty, labels, tmp_path / "o.json", progress=False)
    with pytest.raises(InputError, match=r"label_format must be one of"):
        convert_ctw1500(images, labels, tmp_path / "o.json", label_format="xml", progress=False)
