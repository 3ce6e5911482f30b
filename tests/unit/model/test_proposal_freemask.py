"""FreeSOLO-style free masks: exact maths on hand-made features, backbone loading, proposer."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torchvision

from uplvp_model.proposal.factory import build_proposer
from uplvp_model.proposal.freemask import FreeMaskProposer, geometry_keep, load_backbone, query_masks


def test_query_masks_split_two_regions_exactly():
    features = torch.zeros(2, 2, 4)
    features[0, :, :2] = 3.0  # left half: direction e1 (length does not matter: cosine)
    features[1, :, 2:] = 0.5  # right half: direction e2
    soft, binary, maskness = query_masks(features, (1.0, 0.5), threshold=0.5)
    assert soft.shape == (8 + 2, 2, 4)  # 2x4 queries at scale 1, 1x2 at scale 0.5
    left = torch.zeros(2, 4, dtype=torch.bool)
    left[:, :2] = True
    for q, is_left in enumerate([1, 1, 0, 0, 1, 1, 0, 0, 1, 0]):
        assert torch.equal(binary[q], left if is_left else ~left)
        torch.testing.assert_close(soft[q], (left if is_left else ~left).float())
    torch.testing.assert_close(maskness, torch.ones(10))


def test_query_masks_min_max_and_maskness_values():
    features = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]]])  # [2, 1, 3]: 0, 45, 90 degrees
    soft, binary, maskness = query_masks(features, (1.0,), threshold=0.5)
    c = math.cos(math.pi / 4)
    torch.testing.assert_close(soft[0, 0], torch.tensor([1.0, c, 0.0]))
    assert binary[0, 0].tolist() == [True, True, False]
    assert binary[1, 0].tolist() == [False, True, False]  # middle query: sims c, 1, c -> 0, 1, 0
    torch.testing.assert_close(maskness, torch.tensor([(1 + c) / 2, 1.0, (1 + c) / 2]))


def test_geometry_keep_drops_wide_top_and_empty_masks():
    binary = torch.zeros(4, 10, 20, dtype=torch.bool)
    binary[0, 5:8, 3:9] = True  # ordinary: kept
    binary[1, 5:8, 0:19] = True  # 19 px wide >= 0.95 * 20: dropped
    binary[2, 0:3, 3:9] = True  # box centre y = 1.5 < 0.2 * 10: dropped
    keep = geometry_keep(binary, max_width_fraction=0.95, top_band=0.2)  # mask 3 empty: dropped
    assert keep.tolist() == [True, False, False, False]


def test_load_backbone_from_moco_style_checkpoint(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        random_body = load_backbone("resnet18", None, "layer2")
    assert "RANDOM weights" in caplog.text
    assert list(random_body._modules) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    net = torchvision.models.resnet18(weights=None)
    state = {f"module.encoder_q.{k}": v + 1.0 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = tmp_path / "moco.pth"
    torch.save({"state_dict": state}, path)
    body = load_backbone("resnet18", str(path), "layer2")
    torch.testing.assert_close(body.conv1.weight, net.conv1.weight + 1.0)
    torch.testing.assert_close(body.layer2[0].bn1.running_mean, net.layer2[0].bn1.running_mean + 1.0)
    del state["module.encoder_q.layer1.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"moco.pth: backbone checkpoint does not fit the model's backbone: 1 model tensors missing \(first: layer1.0.conv1.weight\)"):
        load_backbone("resnet18", str(path), "layer2")
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("vgg16", None, "layer3")


def test_freemask_proposer_returns_well_formed_deterministic_results():
    options = dict(backbone="resnet18", input_size=64, min_maskness=0.0, min_score=0.0, min_area=4)
    with pytest.raises(ValueError, match="no backbone checkpoint given: random weights give"):
        build_proposer("freemask", **options)
    proposer = build_proposer("freemask", random_weights=True, **options)
    assert isinstance(proposer, FreeMaskProposer) and proposer.embedding_dim == 256
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (64, 30, 3), dtype=np.uint8)]
    results = proposer.propose(images)
    assert len(results) == 2 and all(0 < len(r) <= 20 for r in results)
    for image, masks in zip(images, results):
        assert [m.score for m in masks] == sorted((m.score for m in masks), reverse=True)
        for m in masks:
            assert m.mask.dtype == bool and m.mask.shape == image.shape[:2] and m.mask.sum() >= 4
            assert (m.label, m.label_index) == ("object", 0) and 0.0 <= m.score <= 1.0
            assert m.embedding.dtype == np.float32 and m.embedding.shape == (256,)
            assert abs(float(np.linalg.norm(m.embedding)) - 1.0) < 1e-5
    again = proposer.propose(images)  # same batch -> bitwise the same output
    assert [[m.score for m in r] for r in again] == [[m.score for m in r] for r in results]
    assert all(np.array_equal(a.mask, b.mask) for r, q in zip(again, results) for a, b in zip(r, q))
    config = proposer.config()
    assert config["pretrained"] is False and config["query_scales"] == [1.0, 0.5, 0.25]
    strict = FreeMaskProposer(backbone="resnet18", input_size=64, min_score=1.01,
                              random_weights=True)
    assert strict.propose(images) == [[], []]
