"""Hungarian target matching: pairwise costs, identity blend and its schedule."""
from __future__ import annotations

import math

import pytest
import torch

from uplvp_model.losses import sample_points
from uplvp_model.matcher import (
    HungarianMatcher,
    identity_cost,
    identity_weight_schedule,
    pairwise_bce_cost,
    pairwise_dice_cost,
    pairwise_focal_cost,
    solve_assignment,
)

LN2 = math.log(2.0)


def test_identity_weight_schedule_start_middle_end():
    assert identity_weight_schedule(0, 100) == pytest.approx(0.1)
    assert identity_weight_schedule(50, 100) == pytest.approx(0.55)
    assert identity_weight_schedule(100, 100) == 1.0
    assert identity_weight_schedule(1000, 100) == 1.0
    assert identity_weight_schedule(5, 0) == 1.0
    assert identity_weight_schedule(10, 20, start=0.0, end=0.5) == pytest.approx(0.25)


def test_pairwise_costs_at_logit_zero():
    logits = torch.zeros(2, 4)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(pairwise_bce_cost(logits, targets), torch.full((2, 2), LN2))
    focal = pairwise_focal_cost(logits, targets)
    # half positives (0.25 * 0.25 ln2) half negatives (0.75 * 0.25 ln2); all positives
    torch.testing.assert_close(focal[0], torch.tensor([0.125 * LN2, 0.0625 * LN2]))
    dice = pairwise_dice_cost(logits, targets)
    # 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4 ; 1 - (2 * 2 + 1) / (2 + 4 + 1) = 2 / 7
    torch.testing.assert_close(dice[0], torch.tensor([0.4, 2 / 7]))


def test_pairwise_costs_match_per_pair_loss_on_random_input():
    logits, targets = torch.randn(3, 6), (torch.rand(2, 6) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, None].expand(3, 2, 6), targets[None].expand(3, 2, 6), reduction="none"
    ).mean(-1)
    torch.testing.assert_close(pairwise_bce_cost(logits, targets), bce)


def test_pairwise_bce_cost_on_large_logits_and_soft_targets():
    # confident masks (|logit| up to 40) and resampled soft targets, against float64 per pair
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 15
    logits[0, :10] = torch.tensor([-40.0, -20.0, -9.0, -1e-4, 0.0, 1e-4, 9.0, 20.0, 40.0, 17.0])
    targets = torch.rand(4, 300)
    targets[0] = (targets[0] > 0.5).float()
    x, t = logits.double()[:, None], targets.double()[None]
    reference = (t * torch.log1p(torch.exp(-x)) + (1 - t) * torch.log1p(torch.exp(x))).mean(-1)
    cost = pairwise_bce_cost(logits, targets)
    assert cost.dtype == torch.float32 and cost.shape == (5, 4)
    torch.testing.assert_close(cost.double(), reference, rtol=1e-5, atol=1e-5)


def test_identity_cost_and_range_check():
    cost = identity_cost(torch.tensor([1, -1, 0]), 2)
    assert cost.tolist() == [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    with pytest.raises(ValueError):
        identity_cost(torch.tensor([2, 0]), 2)


def test_solve_assignment_on_a_hand_made_cost():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = solve_assignment(cost)  # optimum 1 + 2 + 2 = 5
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]
    rows, cols = solve_assignment(torch.tensor([[5.0], [1.0], [3.0]]))  # 3 kernels, 1 target
    assert rows.tolist() == [1] and cols.tolist() == [0]
    with pytest.raises(ValueError):
        solve_assignment(torch.tensor([[float("nan")]]))


def _scene():
    """3 target masks on a 16 x 16 image; kernel k predicts target (2, 0, 1)[k], kernel 3 nothing."""
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, :8, :8] = True
    masks[1, 8:, :8] = True
    masks[2, :, 8:] = True
    order = [2, 0, 1]
    pred_masks = torch.full((1, 4, 8, 8), -20.0)
    for k, t in enumerate(order):
        pred_masks[0, k][masks[t, ::2, ::2]] = 20.0
    pred_logits = torch.zeros(1, 4, 2)
    targets = [{"labels": torch.zeros(3, dtype=torch.long), "masks": masks}]
    return pred_logits, pred_masks, targets


@pytest.mark.parametrize("num_points", [None, 64])
def test_matcher_recovers_the_permutation(num_points):
    pred_logits, pred_masks, targets = _scene()
    matcher = HungarianMatcher(num_points=num_points)
    [(kernels, tgts)] = matcher(pred_logits, pred_masks, targets, generator=torch.Generator().manual_seed(0))
    assert kernels.tolist() == [0, 1, 2] and tgts.tolist() == [2, 0, 1]


def test_identity_blend_overrides_masks_at_full_weight():
    pred_logits, pred_masks, targets = _scene()
    k2p = [torch.tensor([-1, 2, 0, 1])]  # kernel 1 got prompt 2, kernel 2 prompt 0, kernel 3 prompt 1
    matcher = HungarianMatcher(num_points=None)
    [(k, t)] = matcher(pred_logits, pred_masks, targets, kernel_to_prompt=k2p, identity_weight=1.0)
    assert k.tolist() == [1, 2, 3] and t.tolist() == [2, 0, 1]
    [(k, t)] = matcher(pred_logits, pred_masks, targets, kernel_to_prompt=k2p, identity_weight=0.0)
    assert k.tolist() == [0, 1, 2] and t.tolist() == [2, 0, 1]
    [(k, t)] = matcher(pred_logits, pred_masks, targets, kernel_to_prompt=k2p, identity_weight=0.1)
    assert k.tolist() == [0, 1, 2]  # masks still dominate at the schedule's start


def test_class_cost_picks_the_most_confident_kernel():
    masks = torch.ones(1, 4, 4, dtype=torch.bool)
    pred_masks = torch.zeros(1, 3, 4, 4)  # identical masks: only the class cost differs
    pred_logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]]])
    matcher = HungarianMatcher(num_points=None)
    cost = matcher.cost_matrix(pred_logits[0], pred_masks[0], torch.zeros(1, dtype=torch.long), masks)
    prob_object = torch.softmax(pred_logits[0], -1)[:, 0]
    torch.testing.assert_close(cost[:, 0] - cost[0, 0], -2.0 * (prob_object - prob_object[0]))
    [(k, t)] = matcher(pred_logits, pred_masks, [{"labels": torch.zeros(1, dtype=torch.long), "masks": masks}])
    assert k.tolist() == [1] and t.tolist() == [0]


def test_seeded_points_give_identical_costs():
    pred_logits, pred_masks, targets = _scene()
    noisy = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    matcher = HungarianMatcher(num_points=10)

    def cost(seed: int) -> torch.Tensor:
        points = sample_points(10, generator=torch.Generator().manual_seed(seed))
        return matcher.cost_matrix(pred_logits[0], noisy, targets[0]["labels"], targets[0]["masks"], points=points)

    assert torch.equal(cost(1), cost(1)) and not torch.equal(cost(1), cost(2))


def test_empty_targets_give_empty_indices():
    pred_logits, pred_masks, _ = _scene()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16, dtype=torch.bool)}]
    [(k, t)] = HungarianMatcher()(pred_logits, pred_masks, empty)
    assert k.shape == (0,) and t.shape == (0,) and k.dtype == torch.long


def test_matcher_rejects_bad_labels_and_weights():
    pred_logits, pred_masks, targets = _scene()
    bad = [{"labels": torch.tensor([0, 1, 0]), "masks": targets[0]["masks"]}]  # C = 1: label 1 invalid
    with pytest.raises(ValueError):
        HungarianMatcher()(pred_logits, pred_masks, bad)
    with pytest.raises(ValueError):
        HungarianMatcher()(pred_logits, pred_masks, targets, identity_weight=1.5)
