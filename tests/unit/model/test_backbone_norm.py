"""Backbone normalisation as detectron2 trains it (frozen | bn | syncbn), the stages' freeze
defaults and the backbone learning-rate multiplier."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from pipeline.evaluation import model_config_of
from pipeline.engine import TrainConfig, param_groups
from stages.training_setup import ModelSection
from uplvp_model.backbone import freeze_batch_norm
from uplvp_model.config import ModelConfig, model_config
from uplvp_model.model import build_model


def _batchnorm_with_stats() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_mean.copy_(torch.tensor([0.4, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    return bn


def test_frozen_batch_norm_normalises_with_the_stored_statistics_in_train_mode():
    bn = _batchnorm_with_stats()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    expected = bn.eval()(x)
    frozen = freeze_batch_norm(nn.Sequential(bn.train()))[0]
    assert isinstance(frozen, FrozenBatchNorm2d)
    frozen.train()
    # (x - mean) / sqrt(var + eps) * weight + bias, computed by hand
    manual = ((x - frozen.running_mean.view(1, 3, 1, 1))
              / torch.sqrt(torch.tensor([4.0, 0.25, 1.0]) + 1e-5).view(1, 3, 1, 1)
              * torch.tensor([1.5, 0.5, 2.0]).view(1, 3, 1, 1)
              + torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1))
    torch.testing.assert_close(frozen(x), expected)
    torch.testing.assert_close(frozen(x), manual)
    assert list(frozen.parameters()) == [] and "num_batches_tracked" not in frozen.state_dict()


def test_auto_norm_is_frozen_with_a_backbone_checkpoint_and_stays_resolved():
    assert model_config("tiny").backbone_norm == "bn"
    assert model_config("tiny", backbone_checkpoint="/w/r18.pth").backbone_norm == "frozen"
    assert model_config("tiny", backbone_checkpoint="/w/r18.pth",
                        backbone_norm="bn").backbone_norm == "bn"
    # evaluate rebuilds without the backbone file: the stored, resolved norm is kept
    stored = model_config("small", backbone_checkpoint="/w/r18.pth").to_dict()
    assert model_config_of({"model_config": stored}, None).backbone_norm == "frozen"
    # configs stored before the field existed trained with BatchNorm
    legacy = {k: v for k, v in stored.items() if k != "backbone_norm"}
    assert ModelConfig.from_dict(legacy).backbone_norm == "bn"
    with pytest.raises(ValueError, match="ModelConfig.backbone_norm: Input should be 'auto', 'frozen', 'bn' or 'syncbn'"):
        model_config("tiny", backbone_norm="group")


def test_frozen_backbone_features_do_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", backbone_norm="frozen")).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    a = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    b = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 3
    alone = model.backbone(a)
    together = model.backbone(torch.cat([a, b]))
    for x, y in zip(alone, together):
        torch.testing.assert_close(x[0], y[0])
    torch.manual_seed(0)
    bn_model = build_model(model_config("tiny", backbone_norm="bn")).train()
    assert not torch.allclose(bn_model.backbone(a)[0][0],
                              bn_model.backbone(torch.cat([a, b]))[0][0])


def test_a_frozen_norm_checkpoint_reloads_strictly():
    torch.manual_seed(0)
    cfg = model_config("tiny", backbone_norm="frozen")
    model = build_model(cfg)
    again = build_model(ModelConfig.from_dict(model.cfg.to_dict()))
    again.load_state_dict(model.state_dict())  # strict: same keys, no num_batches_tracked
    assert dataclasses.asdict(again.cfg) == dataclasses.asdict(model.cfg)


def test_syncbn_converts_the_backbone_and_runs_as_batch_norm_in_one_process():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", backbone_norm="syncbn")).train()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.backbone.modules())
    out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out["pred_masks"]).all()


def test_stage_freeze_defaults():
    with_weights = ModelSection(preset="tiny", backbone_checkpoint="/w/r18.pth")
    assert with_weights.build_config(1, freeze_pretrained_backbone=True).freeze_backbone
    assert not with_weights.build_config(3).freeze_backbone  # finetune trains it
    assert not ModelSection(preset="tiny").build_config(
        1, freeze_pretrained_backbone=True).freeze_backbone  # random init: never frozen
    explicit = ModelSection(preset="tiny", backbone_checkpoint="/w/r18.pth",
                            freeze_backbone=False)
    assert not explicit.build_config(1, freeze_pretrained_backbone=True).freeze_backbone


def test_backbone_learning_rate_multiplier_groups_exactly_the_backbone():
    torch.manual_seed(0)
    model = build_model(model_config("tiny"))
    assert len(param_groups(model, TrainConfig(max_steps=1))) == 1
    groups = param_groups(model, TrainConfig(max_steps=1, lr=1e-3, backbone_lr_multiplier=0.1))
    assert len(groups) == 2
    rest, backbone = groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert backbone["lr"] == pytest.approx(1e-4) and "lr" not in rest
    assert len(rest["params"]) + len(backbone["params"]) == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-4])


def test_the_mask_rcnn_peers_fpn_learns_at_the_head_rate():
    import importlib

    peers = importlib.import_module("experiments.peer_models")
    torch.manual_seed(0)
    model = peers.build_maskrcnn_tiny(3, 64)
    rest, backbone = param_groups(model, TrainConfig(max_steps=1, lr=1e-3,
                                                     backbone_lr_multiplier=0.25))
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.body.parameters()}
    fpn = {id(p) for p in model.backbone.fpn.parameters()}
    assert fpn and fpn <= {id(p) for p in rest["params"]}
    assert backbone["lr"] == pytest.approx(2.5e-4)


def test_finetune_init_from_a_frozen_norm_pretraining_into_batch_norm(tmp_path):
    from stages.finetune import initialise_from
    from tests.helpers.training import pretrained_checkpoint

    path, pretrained = pretrained_checkpoint(tmp_path, backbone_norm="frozen")
    model = build_model(model_config("tiny", num_classes=3, backbone_norm="bn"))
    report = initialise_from(model, str(path))  # num_batches_tracked is no missing weight
    assert report["loaded"] > 0
    source = pretrained.state_dict()
    torch.testing.assert_close(model.backbone.body[0][1].running_var,
                               source["backbone.body.0.1.running_var"])
