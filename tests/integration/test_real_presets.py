"""The presets users train at scale, run for real on CPU: ResNet-18 `small` and ResNet-50 `base`,
both decoders, a forward and backward pass of the fine-tuning loss at 64-96 px."""
from __future__ import annotations

import pytest
import torch

from uplvp_model.config import model_config
from uplvp_model.criterion import SetCriterion
from uplvp_model.model import build_model


@pytest.mark.parametrize("preset,size", [("small", 64), ("base", 96)])
@pytest.mark.parametrize("decoder", ["knet", "mask2former"])
def test_preset_forward_backward(preset, size, decoder):
    torch.manual_seed(0)
    cfg = model_config(preset, decoder=decoder, num_classes=3)
    model = build_model(cfg).train()
    depth = {"small": 18, "base": 50}[preset]
    assert cfg.backbone == f"resnet{depth}" and model.backbone.out_channels[-1] == (
        512 if depth == 18 else 2048)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(1, size, size, dtype=torch.bool)
    masks[0, size // 4: size // 2, size // 4: 3 * size // 4] = True
    targets = [{"labels": torch.tensor([2]), "masks": masks},
               {"labels": torch.tensor([0]), "masks": masks.flip(-1)}]
    outputs = model(images)
    stride = cfg.mask_stride
    assert outputs["pred_logits"].shape == (2, cfg.num_kernels, 4)
    assert outputs["pred_masks"].shape == (2, cfg.num_kernels, size // stride, size // stride)
    losses = SetCriterion(num_points=None)(outputs, targets)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    conv1 = model.backbone.body.conv1.weight.grad
    assert conv1 is not None and torch.isfinite(conv1).all() and conv1.abs().sum() > 0
