"""Which predictions assign targets to each decoder stage: "own" (DETR, Mask2Former) or
"previous" (K-Net's KernelIterHead: stage s from the predictions of stage s - 1); and the
fine-tuning mask-loss weights of each decoder's reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from stages.finetune import FinetuneConfig
from stages.pretrain import LossSection
from uplvp_model.criterion import (
    PretrainCriterion,
    SetCriterion,
    assignment_layers,
)

S = 8  # mask side


def _target() -> list[dict]:
    mask = torch.zeros(1, S, S, dtype=torch.bool)
    mask[0, :, : S // 2] = True
    return [{"labels": torch.tensor([0]), "masks": mask, "prompts": torch.ones(1, 4)}]


def _stages(target: torch.Tensor) -> dict:
    """Three stages of three kernels; at stage s only kernel s predicts the target (logits +-9),
    the others predict its complement."""
    right = torch.where(target, 9.0, -9.0)
    outs = []
    for s in range(3):
        masks = torch.stack([right if k == s else -right for k in range(3)])[None]
        outs.append({"pred_logits": torch.zeros(1, 3, 2), "pred_masks": masks,
                     "kernels": torch.zeros(1, 3, 4)})
    return {**outs[-1], "aux_outputs": outs[:-1]}


def _bce_of(logits: torch.Tensor, target: torch.Tensor) -> float:
    return F.binary_cross_entropy_with_logits(logits, target.float()).item()


def test_previous_assigns_each_stage_from_the_one_before():
    targets = _target()
    outputs = _stages(targets[0]["masks"][0])
    kwargs = dict(num_points=None, ce_weight=1.0, bce_weight=1.0, dice_weight=0.0)
    own = SetCriterion(**kwargs)(outputs, targets)
    previous = SetCriterion(stage_assignment="previous", **kwargs)(outputs, targets)
    # own: every stage takes its own right kernel
    for key in ("loss_bce", "loss_bce_aux0", "loss_bce_aux1"):
        assert own[key].item() < 1e-3
    # previous: stage 0 from itself (kernel 0, right); stage 1 from stage 0 (kernel 0, whose
    # stage-1 mask is the complement); the final stage from stage 1 (kernel 1, likewise)
    target = targets[0]["masks"][0]
    wrong = _bce_of(outputs["aux_outputs"][1]["pred_masks"][0, 0], target)
    assert wrong > 8.0
    assert previous["loss_bce_aux0"].item() < 1e-3
    assert previous["loss_bce_aux1"].item() == pytest.approx(wrong, rel=1e-5)
    assert previous["loss_bce"].item() == pytest.approx(
        _bce_of(outputs["pred_masks"][0, 1], target), rel=1e-5)


def test_previous_assignment_in_pretraining():
    targets = _target()
    outputs = _stages(targets[0]["masks"][0])
    kwargs = dict(num_points=None, focal_weight=0.0, bce_weight=1.0, dice_weight=0.0,
                  embedding_weight=0.0)
    own = PretrainCriterion(**kwargs)(outputs, targets)
    previous = PretrainCriterion(stage_assignment="previous", **kwargs)(outputs, targets)
    assert own["loss_bce"].item() < 1e-3 and own["loss_bce_aux1"].item() < 1e-3
    assert previous["loss_bce_aux0"].item() < 1e-3
    assert previous["loss_bce_aux1"].item() > 8.0 and previous["loss_bce"].item() > 8.0


def test_assignment_layers_pairs_every_layer_with_its_source():
    outputs = _stages(_target()[0]["masks"][0])
    aux0, aux1 = outputs["aux_outputs"]
    pairs = {suffix: source for suffix, _, source in assignment_layers(outputs, "previous")}
    assert pairs["_aux0"] is aux0 and pairs["_aux1"] is aux0 and pairs[""] is aux1
    own = assignment_layers(outputs, "own")
    assert all(layer is source for _, layer, source in own)
    assert [suffix for suffix, _, _ in own] == ["", "_aux0", "_aux1"]


def test_stages_default_to_previous_and_bad_values_are_refused():
    assert FinetuneConfig.model_fields["stage_assignment"].default == "previous"
    assert LossSection().stage_assignment == "previous"
    assert SetCriterion().stage_assignment == "own"  # the criteria keep DETR's behaviour
    with pytest.raises(ValueError, match="stage_assignment"):
        SetCriterion(stage_assignment="auto")
    with pytest.raises(ValueError, match="stage_assignment"):
        PretrainCriterion(stage_assignment="next")


def test_finetune_mask_weights_default_to_each_decoders_reference(tmp_path):
    from stages.finetune import mask_weights

    cfg = FinetuneConfig(train_data=tmp_path / "t.yaml", out=tmp_path / "out")
    assert mask_weights(cfg, "knet") == {"bce_weight": 1.0, "dice_weight": 4.0}
    assert mask_weights(cfg, "mask2former") == {"bce_weight": 5.0, "dice_weight": 5.0}
    set_one = cfg.model_copy(update={"bce_weight": 2.5})
    assert mask_weights(set_one, "knet") == {"bce_weight": 2.5, "dice_weight": 4.0}
