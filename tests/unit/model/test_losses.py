"""Loss functions and sampling helpers, checked against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from uplvp_model.losses import (
    kernel_embedding_loss,
    mask_bce_loss,
    mask_dice_loss,
    mask_focal_loss,
    point_sample,
    resize_masks,
    sample_points,
    text_alignment_loss,
    uncertain_points,
)

LN2 = math.log(2.0)


def test_focal_at_logit_zero():
    # p = 0.5: target 1 -> alpha * 0.5^2 * ln2 ; target 0 -> (1 - alpha) * 0.5^2 * ln2
    loss = mask_focal_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), 1)
    expected = (0.25 * 0.25 * LN2 + 0.75 * 0.25 * LN2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bce_at_logit_zero_and_normalisation_by_num_masks():
    loss = mask_bce_loss(torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), 4)
    assert loss.item() == pytest.approx(2 * LN2 / 4, rel=1e-6)


def test_dice_identical_masks_is_zero_and_half_prob_known_value():
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert mask_dice_loss((target * 2 - 1) * 100, target, 1).item() == 0.0
    # p = 0.5 everywhere: 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4
    assert mask_dice_loss(torch.zeros(1, 4), target, 1).item() == pytest.approx(0.4, rel=1e-6)


@pytest.mark.parametrize("loss_fn", [mask_focal_loss, mask_bce_loss, mask_dice_loss])
def test_mask_losses_on_no_masks_are_exact_zero_with_finite_grad(loss_fn):
    logits = torch.zeros(0, 5, requires_grad=True)
    loss = loss_fn(logits, torch.zeros(0, 5), 0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_kernel_embedding_loss_values_and_empty():
    kernels = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    targets = torch.tensor([[5.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # cos = 1, 0, -1
    assert kernel_embedding_loss(kernels, targets).item() == pytest.approx((0 + 1 + 2) / 3)
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = kernel_embedding_loss(empty, torch.zeros(0, 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(empty.grad).all()
    with pytest.raises(ValueError):
        kernel_embedding_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_text_alignment_loss_exact_value():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    proj = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    loss = text_alignment_loss(proj, text, torch.tensor([0, 1]), temperature=0.5)
    # logits (1, 0) / 0.5 for the right class -> CE = log(1 + exp(-2))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    empty = torch.zeros(0, 2, requires_grad=True)
    assert text_alignment_loss(empty, text, torch.zeros(0, dtype=torch.long)).item() == 0.0
    with pytest.raises(ValueError):
        text_alignment_loss(proj, text, torch.tensor([0, 2]))


def test_point_sample_hits_pixel_centres_and_interpolates():
    masks = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    shared = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5]])  # (x, y)
    assert point_sample(masks, shared).tolist() == [[0.0, 1.0, 2.0, 1.5]]
    per_mask = torch.stack([shared[:2], shared[2:]])  # [2, 2, 2]
    two = torch.stack([masks[0], masks[0] + 10])
    assert point_sample(two, per_mask).tolist() == [[0.0, 1.0], [12.0, 11.5]]
    assert point_sample(masks.bool(), shared[:1]).dtype == torch.float32


def test_sample_points_seeded_and_in_unit_square():
    a = sample_points(7, num_sets=3, generator=torch.Generator().manual_seed(0))
    b = sample_points(7, num_sets=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 7, 2) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert sample_points(4).shape == (4, 2)


def test_resize_masks():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0] = True
    out = resize_masks(masks, (4, 4))
    assert out.dtype == torch.float32 and out.shape == (2, 4, 4)
    assert torch.equal(out[0], torch.ones(4, 4)) and torch.equal(out[1], torch.zeros(4, 4))
    assert torch.equal(resize_masks(masks, (8, 8)), masks.float())
    assert resize_masks(torch.zeros(0, 8, 8), (2, 3)).shape == (0, 2, 3)


def _band_logits() -> torch.Tensor:
    """One 16x16 mask: logit 0 (uncertain) in columns 6-9, +-20 elsewhere."""
    logits = torch.full((1, 16, 16), 20.0)
    logits[0, :, :6] = -20.0
    logits[0, :, 6:10] = 0.0
    return logits


def test_uncertain_points_all_importance_lie_in_the_uncertain_band():
    points = uncertain_points(_band_logits(), 200, oversample_ratio=4.0, importance_sample_ratio=1.0,
                              generator=torch.Generator().manual_seed(0))
    assert points.shape == (1, 200, 2)
    # columns 6-9 span x in [6/16, 10/16]; bilinear blending only reaches |logit| < 20 within
    # half a pixel of the band, so every kept point is in [5.5/16, 10.5/16]
    x = points[0, :, 0]
    assert bool(((x > 5.5 / 16) & (x < 10.5 / 16)).all())
    assert float(point_sample(_band_logits(), points[0]).abs().max()) < 20.0


def test_uncertain_points_mix_and_uniform_limit():
    logits = _band_logits()
    mixed = uncertain_points(logits, 100, oversample_ratio=3.0, importance_sample_ratio=0.75,
                             generator=torch.Generator().manual_seed(1))
    x = mixed[0, :, 0]
    in_band = (x > 5.5 / 16) & (x < 10.5 / 16)
    # the first 75 are the importance points; the last 25 are uniform (band is 1/4 of the width)
    assert bool(in_band[:75].all()) and int(in_band[75:].sum()) < 25
    # ratio 0: the candidates are drawn and discarded, then 100 uniform points from the same stream
    generator = torch.Generator().manual_seed(2)
    uniform = uncertain_points(logits, 100, oversample_ratio=3.0, importance_sample_ratio=0.0,
                               generator=generator)
    reference = torch.Generator().manual_seed(2)
    sample_points(300, num_sets=1, generator=reference)
    assert torch.equal(uniform, sample_points(100, num_sets=1, generator=reference))


@pytest.mark.parametrize("kwargs", [{"oversample_ratio": 0.5}, {"importance_sample_ratio": 1.5},
                                    {"importance_sample_ratio": -0.1}])
def test_uncertain_points_rejects_bad_ratios(kwargs):
    with pytest.raises(ValueError):
        uncertain_points(_band_logits(), 10, **kwargs)
