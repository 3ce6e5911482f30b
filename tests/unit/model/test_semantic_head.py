"""The dense semantic head (K-Net's ``conv_seg`` / ``loss_rpn_seg``): label maps, the focal
loss against an independent computation, the head's place in the model and both criteria."""
import math

import pytest
import torch

from uplvp_model.config import model_config
from uplvp_model.criterion import PretrainCriterion, SetCriterion
from uplvp_model.losses import semantic_focal_loss, semantic_label_map
from uplvp_model.model import build_model


def test_label_map_later_masks_win_and_uncovered_pixels_are_background():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2, :2] = True  # label 2
    a[1, 1:3, 1:3] = True  # label 0, overlaps a[0] at (1, 1): the later mask wins
    b = torch.zeros(0, 4, 4, dtype=torch.bool)
    labels = semantic_label_map([{"masks": a, "labels": torch.tensor([2, 0])},
                                 {"masks": b, "labels": torch.tensor([], dtype=torch.long)}],
                                3, (4, 4))
    assert labels[0].tolist() == [[2, 2, 3, 3], [2, 0, 0, 3], [3, 0, 0, 3], [3, 3, 3, 3]]
    assert labels[1].eq(3).all()
    # resized to half size: a 2x2 block becomes one pixel of value 1.0 (>= 0.5)
    half = semantic_label_map([{"masks": a[:1], "labels": torch.tensor([1])}], 3, (2, 2))
    assert half[0].tolist() == [[1, 3], [3, 3]]
    with pytest.raises(ValueError, match="outside"):
        semantic_label_map([{"masks": a[:1], "labels": torch.tensor([3])}], 3, (4, 4))


def test_focal_loss_equals_the_formula_over_foreground_pixels():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, -3.0]]]])  # [B=1, C=2, 1, 2]
    label_map = torch.tensor([[[1, 2]]])  # pixel 0: class 1; pixel 1: background
    expected = 0.0
    for c in range(2):
        for j in range(2):
            x = float(logits[0, c, 0, j])
            t = 1.0 if (c == 1 and j == 0) else 0.0
            p = 1 / (1 + math.exp(-x))
            ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            alpha_t = 0.25 * t + 0.75 * (1 - t)
            expected += alpha_t * (1 - p_t) ** 2 * ce
    loss = semantic_focal_loss(logits, label_map)
    assert loss.item() == pytest.approx(expected / 1, rel=1e-6)  # one foreground pixel
    all_background = semantic_focal_loss(logits, torch.full((1, 1, 2), 2))
    assert all_background.item() > 0  # still penalises every positive logit, / max(0, 1)
    with pytest.raises(ValueError, match="label_map must be"):
        semantic_focal_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long))


def test_the_head_predicts_per_class_maps_and_is_a_class_head():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", num_classes=3, semantic_head=True))
    out = model(torch.randn(2, 3, 64, 64))
    assert tuple(out["pred_semantic"].shape) == (2, 3, 16, 16)  # C maps at the mask stride
    # K-Net's prior init: every pixel starts near probability 0.01
    assert out["pred_semantic"].sigmoid().mean().item() == pytest.approx(0.01, abs=0.005)
    assert {"semantic_head.weight", "semantic_head.bias"} <= set(model.class_head_keys())
    model.reset_class_head(5)
    assert model.semantic_head.out_channels == 5 and model.cfg.num_classes == 5
    plain = build_model(model_config("tiny", num_classes=3))
    assert "pred_semantic" not in plain(torch.randn(1, 3, 64, 64))
    assert not any("semantic" in k for k in plain.state_dict())


def targets():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :32, :32] = True
    masks[1, 40:, 40:] = True
    return [{"masks": masks, "labels": torch.tensor([0, 2])},
            {"masks": masks[:1], "labels": torch.tensor([1])}]


def test_both_criteria_add_the_weighted_term_once_when_the_model_has_the_head():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", num_classes=3, semantic_head=True))
    out = model(torch.randn(2, 3, 64, 64))
    direct = semantic_focal_loss(out["pred_semantic"],
                                 semantic_label_map(targets(), 3, (16, 16)))
    losses = SetCriterion(num_points=None, semantic_weight=2.0)(out, targets())
    assert losses["loss_semantic"].item() == pytest.approx(2.0 * direct.item(), rel=1e-6)
    assert [k for k in losses if "semantic" in k] == ["loss_semantic"]  # not per layer
    others = sum(v for k, v in losses.items() if k not in ("loss", "loss_semantic"))
    assert losses["loss"].item() == pytest.approx((others + losses["loss_semantic"]).item())
    losses["loss"].backward()
    assert model.semantic_head.weight.grad.abs().sum() > 0
    assert model.pixel_decoder.parameters().__next__().grad is not None  # dense signal flows back

    pre_model = build_model(model_config("tiny", num_classes=1, semantic_head=True))
    pre_out = pre_model(torch.randn(2, 3, 64, 64))
    agnostic = [{**t, "labels": torch.zeros_like(t["labels"]),
                 "prompts": torch.zeros(len(t["labels"]), 32)} for t in targets()]
    pre = PretrainCriterion(num_points=None, embedding_weight=0.0)(pre_out, agnostic)
    expected = semantic_focal_loss(pre_out["pred_semantic"],
                                   semantic_label_map(agnostic, 1, (16, 16)))
    assert pre["loss_semantic"].item() == pytest.approx(expected.item(), rel=1e-6)
    without = SetCriterion(num_points=None)(build_model(model_config("tiny", num_classes=3))(
        torch.randn(2, 3, 64, 64)), targets())
    assert "loss_semantic" not in without
