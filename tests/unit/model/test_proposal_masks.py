"""Exact-value tests for proposal/masks.py and proposal/ingredients.py on hand-made arrays."""
from __future__ import annotations

import math

import numpy as np
import pytest

from uplvp_model.proposal.base import Letterbox, letterbox_batch, mask_to_canvas
from uplvp_model.proposal.ingredients import (
    l2_normalise,
    mask_box_xywh,
    mask_pooled_embedding,
    pack_bits,
    shape_grid,
    unpack_bits,
)
from uplvp_model.proposal.masks import (
    mask_iou_matrix,
    mask_nms,
    masks_from_probability_maps,
    matrix_nms,
)


def _row_mask(width: int, start: int, stop: int) -> np.ndarray:
    """A [1, width] mask with columns start..stop-1 on."""
    mask = np.zeros((1, width), dtype=bool)
    mask[0, start:stop] = True
    return mask


def test_mask_iou_matrix_exact():
    masks = np.stack([_row_mask(10, 0, 4), _row_mask(10, 2, 6), _row_mask(10, 8, 10), _row_mask(10, 0, 0)])
    iou = mask_iou_matrix(masks)
    expected = np.array(
        [
            [1.0, 2 / 6, 0.0, 0.0],
            [2 / 6, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],  # empty mask: IoU 0, even with itself
        ]
    )
    np.testing.assert_allclose(iou, expected)


def test_mask_nms_keeps_order_and_threshold_is_strict():
    masks = np.stack([_row_mask(10, 0, 4), _row_mask(10, 2, 6), _row_mask(10, 0, 4), _row_mask(10, 7, 10)])
    scores = np.array([0.5, 0.9, 0.4, 0.9])
    # IoU(0, 1) = 1/3: kept at threshold 1/3 (not strictly greater), dropped at 0.3.
    np.testing.assert_array_equal(mask_nms(masks, scores, 1 / 3), [1, 3, 0])
    np.testing.assert_array_equal(mask_nms(masks, scores, 0.3), [1, 3])
    assert mask_nms(masks[:0], scores[:0], 0.5).shape == (0,)


def test_matrix_nms_gaussian_decay_and_compensation():
    masks = np.stack([_row_mask(10, 0, 4), _row_mask(10, 2, 6), _row_mask(10, 4, 8), _row_mask(10, 0, 4)])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    decayed = matrix_nms(masks, scores, sigma=2.0)
    # mask 1 overlaps mask 0 with IoU 1/3; mask 2 overlaps only mask 1 (IoU 1/3), which is itself
    # compensated by the same IoU, so mask 2 keeps its score; mask 3 duplicates mask 0 (IoU 1).
    expected = [0.9, 0.8 * math.exp(-2 / 9), 0.7, 0.6 * math.exp(-2.0)]
    np.testing.assert_allclose(decayed, expected, rtol=1e-12)


def test_matrix_nms_returns_input_order():
    masks = np.stack([_row_mask(10, 0, 4), _row_mask(10, 0, 4)])
    decayed = matrix_nms(masks, np.array([0.5, 0.9]))
    np.testing.assert_allclose(decayed, [0.5 * math.exp(-2.0), 0.9])


def _hand_made_maps() -> np.ndarray:
    prob = np.zeros((3, 10, 10))
    prob[0, 1:4, 1:4] = 0.9  # A: 9 px, peak 0.9
    prob[0, 6:9, 6:9] = 0.6  # above threshold but its own peak is below min_peak
    prob[1, 1:4, 2:5] = 0.8  # B: overlaps A, IoU 6/12 = 0.5
    prob[1, 6:8, 0:2] = 0.85  # C: 4 px
    prob[1, 9, 9] = 0.95  # 1 px: below min_area, but sets class 1's max
    prob[2, 0:5, 5:10] = 0.7  # class 2 never reaches min_peak
    return prob


def test_masks_from_probability_maps_exact():
    prob = _hand_made_maps()
    found = masks_from_probability_maps(prob, threshold=0.5, min_peak=0.8, min_area=4, nms_iou=0.5)
    assert [c.class_index for c in found] == [0, 1, 1]
    scores = [c.score for c in found]
    # score = mean prob inside x mean of the min-max normalised class map inside
    np.testing.assert_allclose(scores, [0.9 * 1.0, 0.85 * 0.85 / 0.95, 0.8 * 0.8 / 0.95])
    expected_a = np.zeros((10, 10), dtype=bool)
    expected_a[1:4, 1:4] = True
    expected_c = np.zeros((10, 10), dtype=bool)
    expected_c[6:8, 0:2] = True
    expected_b = np.zeros((10, 10), dtype=bool)
    expected_b[1:4, 2:5] = True
    for candidate, expected in zip(found, [expected_a, expected_c, expected_b]):
        assert candidate.mask.dtype == bool
        np.testing.assert_array_equal(candidate.mask, expected)


def test_masks_from_probability_maps_nms_top_k_and_area_filters():
    prob = _hand_made_maps()
    stricter = masks_from_probability_maps(prob, threshold=0.5, min_peak=0.8, min_area=4, nms_iou=0.4)
    assert [(c.class_index, round(c.score, 6)) for c in stricter] == [(0, 0.9), (1, round(0.85**2 / 0.95, 6))]
    top1 = masks_from_probability_maps(prob, threshold=0.5, min_peak=0.8, min_area=4, top_k=1)
    assert len(top1) == 1 and top1[0].class_index == 0
    big = masks_from_probability_maps(prob, threshold=0.5, min_peak=0.8, min_area=5)
    assert [c.class_index for c in big] == [0, 1]  # C (4 px) dropped
    full = np.ones((1, 10, 10))
    assert masks_from_probability_maps(full, threshold=0.5, min_peak=0.8) == []
    kept = masks_from_probability_maps(full, threshold=0.5, min_peak=0.8, min_area=1, max_area_fraction=1.0)
    assert len(kept) == 1 and kept[0].mask.all() and kept[0].score == 1.0


def test_masks_from_probability_maps_is_deterministic():
    rng = np.random.default_rng(0)
    prob = rng.random((4, 24, 24))
    first = masks_from_probability_maps(prob, threshold=0.6, min_peak=0.9, min_area=2)
    second = masks_from_probability_maps(prob.copy(), threshold=0.6, min_peak=0.9, min_area=2)
    assert len(first) > 0
    assert [(c.class_index, c.score) for c in first] == [(c.class_index, c.score) for c in second]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(first, second))
    assert all(a.score >= b.score for a, b in zip(first, first[1:]))


def test_mask_box_xywh():
    mask = np.zeros((8, 10), dtype=bool)
    mask[5, 3] = True
    assert mask_box_xywh(mask) == (3.0, 5.0, 1.0, 1.0)
    mask[2, 7] = True
    assert mask_box_xywh(mask) == (3.0, 2.0, 5.0, 4.0)
    with pytest.raises(ValueError, match="empty"):
        mask_box_xywh(np.zeros((4, 4), dtype=bool))


def test_shape_grid_crops_to_box_and_uses_half_coverage():
    mask = np.zeros((20, 20), dtype=bool)
    mask[4:8, 6:10] = True  # 4x4 box
    mask[4:6, 6:8] = False  # top-left quarter empty
    grid = shape_grid(mask, grid=2)
    np.testing.assert_array_equal(grid, [[False, True], [True, True]])
    # a 4x4 box shrunk to 2x2: a cell half covered is on, a quarter covered is off
    half = np.zeros((4, 4), dtype=bool)
    half[:, 0] = True
    half[0, 3] = True
    np.testing.assert_array_equal(shape_grid(half, grid=2), [[True, False], [True, False]])
    up = shape_grid(np.ones((2, 3), dtype=bool), grid=4)
    assert up.shape == (4, 4) and up.all()


def test_pack_unpack_bits_roundtrip_and_layout():
    grid = np.zeros((4, 4), dtype=bool)
    grid[0, 0] = True  # first cell -> highest bit of byte 0
    grid[3, 3] = True  # last cell -> lowest bit of byte 1
    data = pack_bits(grid)
    assert data == bytes([0b10000000, 0b00000001])
    np.testing.assert_array_equal(unpack_bits(data, 4), grid)
    rng = np.random.default_rng(1)
    odd = rng.random((5, 5)) > 0.5  # 25 bits -> 4 bytes
    assert len(pack_bits(odd)) == 4
    np.testing.assert_array_equal(unpack_bits(pack_bits(odd), 5), odd)
    with pytest.raises(ValueError, match="needs 4 bytes"):
        unpack_bits(b"\x00", 5)


def test_mask_pooled_embedding_weights_cells_by_coverage():
    dense = np.zeros((2, 2, 2), dtype=np.float32)
    dense[:, 0, 0] = [3.0, 4.0]
    dense[:, 0, 1] = [1.0, 0.0]
    mask = np.zeros((4, 4), dtype=bool)
    mask[0:2, 0:2] = True  # exactly the top-left feature cell
    np.testing.assert_allclose(mask_pooled_embedding(dense, mask), [0.6, 0.8], rtol=1e-6)
    mask[0:2, 2:4] = True  # plus the top-right cell: mean = (2, 2)
    pooled = mask_pooled_embedding(dense, mask)
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, [math.sqrt(0.5), math.sqrt(0.5)], rtol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        mask_pooled_embedding(dense, np.zeros((4, 4), dtype=bool))


def test_l2_normalise_zero_vector_stays_zero():
    np.testing.assert_array_equal(l2_normalise(np.zeros(3)), np.zeros(3, dtype=np.float32))
    np.testing.assert_allclose(l2_normalise(np.array([0.0, 2.0])), [0.0, 1.0])


def test_mask_nms_max_keep_stops_early():
    masks = np.stack([_row_mask(10, 0, 2), _row_mask(10, 3, 5), _row_mask(10, 6, 8), _row_mask(10, 0, 2)])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    np.testing.assert_array_equal(mask_nms(masks, scores, 0.5), [3, 1, 2])
    np.testing.assert_array_equal(mask_nms(masks, scores, 0.5, max_keep=2), [3, 1])


def test_letterbox_batch_and_mask_to_canvas():
    image = np.zeros((20, 10, 3), np.uint8)
    image[:, :, 0] = 255  # pure red
    canvas, boxes = letterbox_batch([image], 8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    assert canvas.shape == (1, 3, 8, 8) and canvas.dtype == np.float32
    assert boxes == [Letterbox(height=20, width=10, scaled_height=8, scaled_width=4)]
    np.testing.assert_allclose(canvas[0, 0, :, :4], 1.0)  # (1 - 0.5) / 0.5
    np.testing.assert_allclose(canvas[0, 1, :, :4], -2.0)  # (0 - 0.5) / 0.25
    np.testing.assert_array_equal(canvas[0, :, :, 4:], 0.0)  # padding = the mean colour
    mask = np.zeros((20, 10), bool)
    mask[:10, :5] = True  # top-left quarter of the image
    weights = mask_to_canvas(mask, boxes[0], (8, 8))
    expected = np.zeros((8, 8), np.float32)
    expected[:4, :2] = 1.0
    np.testing.assert_allclose(weights, expected)
    with pytest.raises(ValueError, match="image 0 must be uint8"):
        letterbox_batch([image.astype(np.float32)], 8, (0, 0, 0), (1, 1, 1))
