"""pipeline.overlays.render_results: predict's detections through the one renderer."""
import numpy as np
import pytest

from pipeline.coco import mask_to_rle
from pipeline.overlays import palette, render_results


def result(mask, category=3, score=0.9):
    ys, xs = np.nonzero(mask)
    return {"segmentation": mask_to_rle(mask), "category_id": category, "score": score,
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                     float(ys.max() - ys.min() + 1)]}


def test_a_detection_is_blended_in_its_colour_and_the_rest_is_untouched():
    image = np.zeros((60, 60, 3), np.uint8)
    mask = np.zeros((60, 60), bool)
    mask[30:45, 20:40] = True
    canvas = render_results(image, [result(mask)], alpha=0.5)
    expected = np.rint(0.5 * palette(1)[0].astype(np.float64)).astype(np.uint8)
    np.testing.assert_array_equal(canvas[37, 30], expected)  # inside, away from the outline
    np.testing.assert_array_equal(canvas[55, 5], [0, 0, 0])  # far from mask, box and caption
    assert canvas.dtype == np.uint8 and image.max() == 0  # a new array


def test_a_mask_of_another_size_is_refused():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    with pytest.raises(ValueError, match="mask size"):
        render_results(np.zeros((12, 10, 3), np.uint8), [result(mask)])
