"""Exact-value tests of pipeline.transforms and pipeline.batching.collate on tiny arrays."""
import numpy as np
import pytest
import torch

from pipeline.batching import collate
from pipeline.transforms import (
    AugmentConfig,
    Sample,
    augment,
    drop_empty_masks,
    eval_config,
    hflip,
    mask_boxes_xyxy,
    normalize_image,
    padded_size,
    resize,
    resized_size,
)
from uplvp_model.backbone import PIXEL_MEAN, PIXEL_STD
from uplvp_model.proposal.ingredients import shape_grid


def _sample(h=8, w=8, masks=None, grids=True) -> Sample:
    image = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    if masks is None:
        masks = np.zeros((2, h, w), dtype=bool)
        masks[0, 1:5, 2:4] = True
        masks[1, 6, 0:7] = True
    m = masks.shape[0]
    return Sample(
        image_id=7,
        image=image,
        masks=masks,
        labels=np.arange(m, dtype=np.int64) + 3,
        orig_size=(h, w),
        shape_grids=np.stack([shape_grid(k, 4) for k in masks]) if grids else None,
        embeddings=np.arange(m * 2, dtype=np.float32).reshape(m, 2) if grids else None,
    )


def test_resized_size_short_side_and_long_side_cap():
    assert resized_size(24, 32, 12, 100) == (12, 16)
    assert resized_size(100, 300, 50, 120) == (40, 120)  # long side caps: scale 0.4
    assert resized_size(3, 5, 4, 100) == (4, 7)  # 6.67 rounds half up to 7
    assert resized_size(1, 1000, 10, 100) == (1, 100)  # at least one pixel


def test_resize_masks_nearest_at_pixel_centres():
    masks = (np.arange(16).reshape(1, 4, 4) % 3 == 0)
    sample = _sample(4, 4, masks, grids=False)
    down = resize(sample, (2, 2))
    # pixel-centre sampling of a 2x shrink takes source rows/columns 1 and 3
    assert down.masks.tolist() == masks[:, [1, 3]][:, :, [1, 3]].tolist()
    assert down.image.shape == (2, 2, 3) and down.image.dtype == np.uint8
    up = resize(sample, (8, 8))
    assert up.masks.tolist() == np.repeat(np.repeat(masks, 2, 1), 2, 2).tolist()
    assert resize(sample, (4, 4)) is sample


def test_hflip_mirrors_masks_grids_and_boxes_consistently():
    masks = np.zeros((1, 6, 10), dtype=bool)
    masks[0, 1:5, 2:4] = True  # an L shape: a bar and a foot to the right
    masks[0, 4, 4:6] = True
    sample = _sample(6, 10, masks)
    flipped = hflip(sample)
    assert flipped.image.tolist() == sample.image[:, ::-1].tolist()
    assert flipped.masks.tolist() == masks[:, :, ::-1].tolist()
    # the flipped grid is exactly the grid of the flipped mask
    assert flipped.shape_grids[0].tolist() == shape_grid(flipped.masks[0], 4).tolist()
    assert flipped.shape_grids[0].tolist() != sample.shape_grids[0].tolist()
    assert mask_boxes_xyxy(sample.masks).tolist() == [[2, 1, 6, 5]]
    assert mask_boxes_xyxy(flipped.masks).tolist() == [[10 - 6, 1, 10 - 2, 5]]
    assert flipped.embeddings is sample.embeddings and flipped.labels is sample.labels


def test_mask_boxes_xyxy_exclusive_max_and_empty():
    masks = np.zeros((3, 7, 9), dtype=bool)
    masks[0, 5, 3] = True
    masks[2, 0:7, 8] = True
    assert mask_boxes_xyxy(masks).tolist() == [[3, 5, 4, 6], [0, 0, 0, 0], [8, 0, 9, 7]]
    assert mask_boxes_xyxy(np.zeros((0, 4, 4), dtype=bool)).shape == (0, 4)


def test_drop_empty_masks_drops_aligned_ingredients():
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[2, 3, 3] = True
    sample = Sample(7, np.zeros((4, 4, 3), dtype=np.uint8), masks, np.array([5, 6, 7]), (4, 4),
                    np.stack([np.full((2, 2), k % 2 == 0) for k in range(3)]),
                    np.array([[0.0], [1.0], [2.0]], dtype=np.float32))
    out = drop_empty_masks(sample)
    assert out.labels.tolist() == [5, 7]
    assert out.embeddings.tolist() == [[0.0], [2.0]]
    assert out.masks.tolist() == masks[[0, 2]].tolist()
    assert out.shape_grids.shape == (2, 2, 2)


def test_augment_drops_vanished_masks_and_is_seeded():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 0, 0] = True  # not sampled by a 2x shrink (rows/cols 1, 3, 5, 7)
    masks[1, 2:8, 2:8] = True
    sample = _sample(8, 8, masks)
    cfg = AugmentConfig(short_side=(4, 4), max_long_side=100, flip_prob=0.0)
    out = augment(sample, cfg, np.random.default_rng(0))
    assert out.masks.shape == (1, 4, 4) and out.labels.tolist() == [4]
    assert out.embeddings.tolist() == [[2.0, 3.0]]
    assert out.shape_grids.tolist() == sample.shape_grids[[1]].tolist()
    assert mask_boxes_xyxy(out.masks).tolist() == [[1, 1, 4, 4]]

    jitter = AugmentConfig(short_side=(5, 12), max_long_side=100, flip_prob=0.5)
    runs = [augment(sample, jitter, np.random.default_rng(s)) for s in (1, 1, 2, 3, 4, 5)]
    assert runs[0].image.tolist() == runs[1].image.tolist()
    assert runs[0].masks.tolist() == runs[1].masks.tolist()
    assert len({r.image.shape for r in runs}) > 1  # the short side is drawn from 5..12
    rng = np.random.default_rng(9)
    expected_side, expected_flip = int(rng.integers(5, 13)), bool(rng.random() < 0.5)
    out = augment(sample, jitter, np.random.default_rng(9))
    assert out.image.shape[:2] == (expected_side, expected_side)
    ref = resize(sample, (expected_side, expected_side))
    ref = hflip(ref) if expected_flip else ref
    assert out.image.tolist() == ref.image.tolist()


def test_always_flip_and_eval_config():
    sample = _sample()
    out = augment(sample, AugmentConfig((8, 8), 100, 1.0), np.random.default_rng(0))
    assert out.masks.tolist() == sample.masks[:, :, ::-1].tolist()
    cfg = eval_config(16, 20)
    assert cfg.short_side == (16, 16) and cfg.flip_prob == 0.0
    assert augment(sample, cfg, np.random.default_rng(3)).image.shape == (16, 16, 3)
    for bad in [dict(short_side=(5, 4)), dict(max_long_side=0), dict(flip_prob=1.5)]:
        with pytest.raises(ValueError):
            AugmentConfig(**bad)


def test_normalize_image_exact_values():
    image = np.zeros((1, 2, 3), dtype=np.uint8)
    image[0, 1] = (255, 0, 51)
    out = normalize_image(image)
    assert out.shape == (3, 1, 2) and out.dtype == np.float32
    expected_r = (1.0 - PIXEL_MEAN[0]) / PIXEL_STD[0]
    assert out[0, 0, 1] == pytest.approx(expected_r, abs=1e-6)
    assert out[1, 0, 1] == pytest.approx(-PIXEL_MEAN[1] / PIXEL_STD[1], abs=1e-6)
    assert out[2, 0, 1] == pytest.approx((0.2 - PIXEL_MEAN[2]) / PIXEL_STD[2], abs=1e-6)


def test_padded_size_multiple_of_32():
    assert padded_size([(24, 32), (40, 10)]) == (64, 32)
    assert padded_size([(32, 64)]) == (32, 64)
    assert padded_size([(1, 33)], 16) == (16, 48)


def test_collate_pads_normalises_and_normalises_boxes_by_padded_size():
    a = _sample(8, 40)
    b = _sample(20, 10)
    batch = collate([a, b])
    assert batch["images"].shape == (2, 3, 32, 64)
    assert torch.equal(batch["images"][0, :, :8, :40], torch.from_numpy(normalize_image(a.image)))
    assert batch["images"][0, :, 8:].abs().sum() == 0
    assert batch["images"][1, :, :, 10:].abs().sum() == 0
    assert batch["image_ids"] == [7, 7] and batch["image_sizes"] == [(8, 40), (20, 10)]
    assert batch["orig_sizes"] == [(8, 40), (20, 10)]
    masks = batch["targets"][0]["masks"]
    assert masks.dtype == torch.bool and masks.shape == (2, 32, 64)
    assert torch.equal(masks[:, :8, :40], torch.from_numpy(a.masks)) and not masks[:, 8:].any()
    assert batch["targets"][1]["labels"].tolist() == [3, 4]
    boxes = batch["prompts"][0]["boxes"]
    assert boxes.tolist() == [[2 / 64, 1 / 32, 4 / 64, 5 / 32], [0.0, 6 / 32, 7 / 64, 7 / 32]]
    assert batch["prompts"][0]["shape_grids"].dtype == torch.float32
    assert batch["prompts"][0]["shape_grids"].shape == (2, 4, 4)
    assert batch["prompts"][1]["embeddings"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert "prompts" not in collate([_sample(grids=False)])


def test_sample_without_masks_goes_through_augment_and_collate():
    empty = _sample(8, 8, np.zeros((0, 8, 8), dtype=bool), grids=False)
    empty = Sample(1, empty.image, empty.masks, empty.labels, (8, 8),
                   np.zeros((0, 4, 4), dtype=bool), np.zeros((0, 2), dtype=np.float32))
    out = augment(empty, AugmentConfig((4, 4), 100, 1.0), np.random.default_rng(0))
    assert out.masks.shape == (0, 4, 4) and out.shape_grids.shape == (0, 4, 4)
    batch = collate([out, augment(_sample(), AugmentConfig((4, 4), 100, 0.0),
                                  np.random.default_rng(0))])
    assert batch["targets"][0]["masks"].shape == (0, 32, 32)
    assert batch["prompts"][0]["boxes"].shape == (0, 4)
    assert batch["prompts"][0]["embeddings"].shape == (0, 2)
