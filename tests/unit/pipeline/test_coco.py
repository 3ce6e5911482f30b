import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from pipeline.coco import (
    annotation_to_mask,
    load_coco,
    mask_bbox_xywh,
    mask_to_polygons,
    mask_to_rle,
    polygons_to_mask,
    rle_to_mask,
)
from pipeline.errors import InputError
from tests.helpers import rect_polygon


def test_polygon_rectangle_rasterises_to_exact_pixels():
    # pycocotools fills a polygon over pixel corners x0..x1: [2, 9) x [2, 12) for this one.
    mask = polygons_to_mask([rect_polygon(2, 2, 9, 12)], 24, 32)
    assert mask.shape == (24, 32) and mask.dtype == bool
    expected = np.zeros((24, 32), bool)
    expected[2:12, 2:9] = True
    assert np.array_equal(mask, expected)


def test_rle_round_trip_and_json_serialisable():
    mask = np.zeros((7, 5), bool)
    mask[1:4, 2:5] = True
    mask[6, 0] = True
    rle = mask_to_rle(mask)
    assert rle["size"] == [7, 5]
    rle = json.loads(json.dumps(rle))
    assert np.array_equal(rle_to_mask(rle), mask)
    assert mask_bbox_xywh(mask) == [0.0, 1.0, 5.0, 6.0]


def test_uncompressed_rle_decodes():
    # column-major runs: 3 zeros, 2 ones, rest zeros, for a 2x3 image
    mask = rle_to_mask({"size": [2, 3], "counts": [3, 2, 1]})
    assert mask.T.reshape(-1).tolist() == [False, False, False, True, True, False]


def test_mask_to_polygons_single_pixel_has_exact_quarter_pixel_outline():
    pixel = np.zeros((4, 5), bool)
    pixel[1, 2] = True
    assert mask_to_polygons(pixel) == [[2.25, 1.25, 2.25, 1.75, 2.75, 1.75, 2.75, 1.25]]
    assert np.array_equal(polygons_to_mask(mask_to_polygons(pixel), 4, 5), pixel)


def test_mask_to_polygons_rasterise_back_to_exactly_the_mask():
    yy, xx = np.mgrid[:40, :50]
    disk = (yy - 20) ** 2 + (xx - 18) ** 2 <= 8**2
    blob = disk | ((yy > 5) & (yy < 9) & (xx > 30) & (xx < 47))  # two components
    polys = mask_to_polygons(blob)
    assert len(polys) == 2
    assert np.array_equal(polygons_to_mask(polys, 40, 50), blob)


def test_annotation_to_mask_handles_both_encodings():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 1:3] = True
    assert np.array_equal(annotation_to_mask({"segmentation": mask_to_rle(mask)}, 8, 8), mask)
    poly_mask = annotation_to_mask({"segmentation": [rect_polygon(1, 2, 3, 6)]}, 8, 8)
    assert np.array_equal(poly_mask, mask)


def test_load_coco_accepts_valid_file_and_pycocotools_agrees(tiny_coco):
    coco = load_coco(tiny_coco["annotations"])
    assert len(coco["images"]) == 10
    api = COCO(str(tiny_coco["annotations"]))
    ann = api.loadAnns([1])[0]
    assert api.annToMask(ann).shape == (24, 32)


def _mutated(tiny_coco, tmp_path, mutate):
    coco = json.loads(tiny_coco["annotations"].read_text())
    mutate(coco)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.pop("annotations"), "missing 'annotations'"),
        (lambda c: c["images"].append(dict(c["images"][0])), "duplicate image id 1"),
        (lambda c: c["annotations"][0].update(image_id=999), "points to missing image id 999"),
        (lambda c: c["annotations"][0].update(category_id=7), "unknown category id 7"),
        (lambda c: c["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), ">= 3 points"),
        (lambda c: c["annotations"][1].update(id=1), "duplicate annotation id 1"),
        (lambda c: c["images"][0].update(height="24"), "images[0].height"),
        (
            lambda c: c["annotations"][0].update(segmentation={"size": [5, 5], "counts": "x"}),
            "RLE size [5, 5] != image size [24, 32]",
        ),
    ],
)
def test_load_coco_rejects_bad_files_with_one_line(tiny_coco, tmp_path, mutate, message):
    path = _mutated(tiny_coco, tmp_path, mutate)
    with pytest.raises(InputError) as info:
        load_coco(path)
    text = str(info.value)
    assert message in text
    assert str(path) in text
    assert "\n" not in text


def test_load_coco_rejects_non_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_coco(path)
