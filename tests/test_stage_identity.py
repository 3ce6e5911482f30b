"""benchmarks/stage_identity.py: per-stage IoU of finally matched kernels, on planted masks."""
from __future__ import annotations

import pytest
import torch

from benchmark_scripts import load_benchmark

stage_identity = load_benchmark("stage_identity")


def _planted():
    # one image, 3 kernels, 4x4 masks; the object is the left half (8 pixels)
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :, :2] = True
    left = torch.full((4, 4), -5.0)
    left[:, :2] = 5.0
    right = -left
    top = torch.full((4, 4), -5.0)
    top[:2, :] = 5.0  # overlaps the object in 4 of 12 pixels of the union
    stage0 = torch.stack([right, left, top])     # kernel 2 covers the top half
    final = torch.stack([left, right, right])    # kernel 0 covers the object at the end
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])  # C = 2
    outputs = {"pred_logits": logits, "pred_masks": final[None],
               "aux_outputs": [{"pred_logits": logits, "pred_masks": stage0[None]}]}
    targets = [{"labels": torch.tensor([0]), "masks": target}]
    return outputs, targets


def test_a_kernel_that_takes_over_its_object_only_at_the_end_has_iou_0_before():
    outputs, targets = _planted()
    facts = stage_identity.stage_identity(outputs, targets, [(torch.tensor([0]), torch.tensor([0]))])
    assert facts["iou"] == [[0.0], [1.0]]
    assert facts["area"] == [[1.0], [1.0]]
    probs = torch.tensor([2.0, 0.0, 0.0]).softmax(0)
    assert facts["p_class"] == pytest.approx([float(probs[0])])
    assert facts["p_none"] == pytest.approx([float(probs[2])])
    # kernel 0's best class probability (0.787) is the highest of the three kernels
    assert facts["rank"] == [0]


def test_partial_overlap_and_rank_of_a_weak_kernel():
    outputs, targets = _planted()
    facts = stage_identity.stage_identity(outputs, targets, [(torch.tensor([2]), torch.tensor([0]))])
    # stage 0: kernel 2 = top half (8 px) vs left half (8 px): 4 shared of 12
    assert facts["iou"][0] == pytest.approx([4 / 12])
    assert facts["iou"][1] == [0.0]
    # kernel 2 puts its mass on "no object": its best class probability is the lowest
    assert facts["rank"] == [2]
    text = stage_identity.report("planted", facts)
    assert "| 0 | 0.333 | 0.333 | 1.00 |" in text and "rank median 2" in text


def test_an_image_without_matches_adds_nothing():
    outputs, targets = _planted()
    empty = torch.zeros(0, dtype=torch.long)
    facts = stage_identity.stage_identity(outputs, targets, [(empty, empty)])
    assert facts["iou"] == [[], []] and facts["rank"] == []


def test_own_matching_counts_objects_held_by_the_final_kernel():
    outputs, targets = _planted()
    # stage 0 matched on its own picks kernel 1 (the left half there), the end kernel 0
    stage_indices = [[(torch.tensor([1]), torch.tensor([0]))], [(torch.tensor([0]), torch.tensor([0]))]]
    facts = stage_identity.own_matching(outputs, targets, stage_indices, stage_indices[-1])
    assert facts["same"] == [[0.0], [1.0]]
    assert facts["own_iou"] == [[1.0], [1.0]]
    uniform = 1 / 3  # kernel 1's logits are all 0
    assert facts["own_p_class"][0] == pytest.approx([uniform])
    text = stage_identity.report("planted", {**stage_identity.stage_identity(
        outputs, targets, stage_indices[-1]), **facts})
    assert "| 0 | 0.000 | 0.000 | 1.00 | 0.00 | 1.000 | 0.333 |" in text
