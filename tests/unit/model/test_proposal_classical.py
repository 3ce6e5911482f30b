"""The weight-free classical proposer: building blocks on hand-made inputs, determinism, and a
small recall check on the synthetic demo data."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.synth import synth_example
from uplvp_model.proposal.factory import build_proposer
from uplvp_model.proposal.classical import (
    EMBEDDING_DIM,
    ClassicalProposer,
    ClassicalSettings,
    candidate_regions,
    pixel_features,
    region_descriptor,
    score_from_cues,
    seeded_kmeans,
)


def _scene(height: int = 64, width: int = 64, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A noisy grey background with a red disk and a striped blue square; returns (image,
    [disk mask, square mask])."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(128, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    disk = np.zeros((height, width), np.uint8)
    cv2.circle(disk, (18, 20), 10, 1, -1)
    square = np.zeros((height, width), bool)
    square[34:56, 36:58] = True
    image[disk.astype(bool)] = (220, 40, 40)
    stripes = (np.arange(width)[None, :] // 3) % 2 == 0
    image[square & stripes] = (40, 60, 200)
    image[square & ~stripes] = (20, 30, 120)
    return image, [disk.astype(bool), square]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def test_seeded_kmeans_finds_separated_clusters_exactly():
    points = np.array([[0, 0], [0, 2], [10, 10], [10, 12], [30, 0], [32, 0]], dtype=np.float32)
    centres = seeded_kmeans(points, 3, iterations=5, seed=0)
    assert sorted(map(tuple, centres.tolist())) == [(0.0, 1.0), (10.0, 11.0), (31.0, 0.0)]
    np.testing.assert_array_equal(centres, seeded_kmeans(points, 3, iterations=5, seed=0))
    assert len(seeded_kmeans(np.zeros((5, 2), np.float32), 3, iterations=2, seed=0)) == 1


def test_candidate_regions_contain_flat_regions_exactly():
    image = np.full((40, 40, 3), 90, np.uint8)
    image[5:15, 5:20] = (250, 250, 0)  # 150 px
    image[22:36, 24:34] = (0, 0, 250)  # 140 px
    settings = ClassicalSettings()
    regions = [region.full(40, 40) for region, _ in candidate_regions(pixel_features(image, settings), settings)]
    for expected in (image[..., 0] == 250, image[..., 2] == 250):
        assert max(_iou(r, expected) for r in regions) >= 0.9
    assert not any(r.sum() > 0.5 * 40 * 40 for r in regions)  # the background is never a candidate


def test_score_rises_with_contrast_and_falls_on_the_border():
    base = np.array([[2.0, 2.0, 0.5, 0.6, 0.9, 0.02, 0.0]])
    more_contrast = base.copy()
    more_contrast[0, 0] = 4.0
    on_border = base.copy()
    on_border[0, 6] = 0.5
    scores = score_from_cues(np.concatenate([base, more_contrast, on_border]))
    assert np.all((scores > 0) & (scores < 1))
    assert scores[1] > scores[0] > scores[2]


def test_region_descriptor_is_unit_norm_and_translation_invariant():
    image = np.full((48, 48, 3), 100, np.uint8)
    image[4:14, 4:16] = (200, 30, 30)
    image[30:40, 30:42] = (200, 30, 30)
    settings = ClassicalSettings()
    pixels = pixel_features(image, settings)
    descriptors = []
    for y, x in ((4, 4), (30, 30)):
        mask = np.zeros((48, 48), bool)
        mask[y : y + 10, x : x + 12] = True
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        descriptors.append(region_descriptor(mask, pixels, list(contours)))
    assert descriptors[0].shape == (EMBEDDING_DIM,) and descriptors[0].dtype == np.float32
    assert abs(float(np.linalg.norm(descriptors[0])) - 1.0) < 1e-5
    np.testing.assert_allclose(descriptors[0], descriptors[1], atol=1e-5)


def test_proposer_finds_both_objects_and_is_deterministic():
    image, objects = _scene()
    proposer = build_proposer("classical")
    assert isinstance(proposer, ClassicalProposer)
    [masks] = proposer.propose([image])
    assert 2 <= len(masks) <= 20
    for expected in objects:
        assert max(_iou(m.mask, expected) for m in masks) >= 0.8
    assert [m.score for m in masks] == sorted((m.score for m in masks), reverse=True)
    for m in masks:
        assert m.mask.dtype == bool and m.mask.shape == image.shape[:2] and m.mask.sum() >= 32
        assert (m.label, m.label_index) == ("object", 0) and 0.0 < m.score < 1.0
        assert m.embedding.shape == (EMBEDDING_DIM,) and abs(float(np.linalg.norm(m.embedding)) - 1.0) < 1e-5
    [again] = ClassicalProposer().propose([image.copy()])
    assert [m.score for m in again] == [m.score for m in masks]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(again, masks))
    assert all(np.array_equal(a.embedding, b.embedding) for a, b in zip(again, masks))


def test_large_images_are_processed_at_max_side_and_masks_come_back_full_size():
    image, objects = _scene(seed=1)
    large = cv2.resize(image, (192, 192), interpolation=cv2.INTER_NEAREST)
    [masks] = ClassicalProposer(max_side=64).propose([large])
    assert masks and all(m.mask.shape == (192, 192) for m in masks)
    big_disk = cv2.resize(objects[0].astype(np.uint8), (192, 192), interpolation=cv2.INTER_NEAREST) > 0
    assert max(_iou(m.mask, big_disk) for m in masks) >= 0.8


def test_options_are_validated_and_reported_in_config():
    proposer = ClassicalProposer(top_k=5, levels=[2, 4])
    config = proposer.config()
    assert config["proposer"] == "classical" and config["top_k"] == 5 and config["levels"] == [2, 4]
    with pytest.raises(ValueError, match="unexpected keyword argument 'nonsense'"):
        build_proposer("classical", nonsense=1)
    with pytest.raises(ValueError, match="invalid settings"):
        ClassicalProposer(min_area=0)
    with pytest.raises(ValueError, match="uint8"):
        proposer.propose([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="unknown proposer"):
        build_proposer("sam")


def test_recall_on_synthetic_demo_images():
    """Quality guard against gross regressions: ground-truth instances of 8 synthetic validation
    images matched at IoU 0.5 (25 of 29 with the defaults; about 0.92 on 60 images)."""
    proposer = ClassicalProposer()
    hits = total = 0
    for index in range(8):
        image, instances = synth_example(0, "val", index, 128)
        [masks] = proposer.propose([image])
        for _, expected in instances:
            hits += max((_iou(m.mask, expected) for m in masks), default=0.0) >= 0.5
            total += 1
    assert total >= 20 and hits / total >= 0.8
