"""K-Net decoder options against independent computations on tiny tensors: hard-mask grouping,
the per-stage feature transform, the gated update with and without its output ReLU, the initial
kernels' std, and how configs stored before these options existed are read."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from uplvp_model.config import ModelConfig, model_config
from uplvp_model.decoders.knet import KernelUpdateStage, KernelUpdator, KNetDecoder


# the options' values before issue 16 made K-Net's reference the default
LEGACY = {"knet_hard_masks": False, "knet_init_std": None, "knet_gate_relu": True,
          "knet_feature_transform": False}


def stage_with(**overrides) -> tuple[KernelUpdateStage, ModelConfig]:
    cfg = model_config("tiny", hidden_dim=8, num_heads=2, ffn_dim=16, **overrides)
    torch.manual_seed(0)
    return KernelUpdateStage(cfg).eval(), cfg


def captured_pooled(stage: KernelUpdateStage, kernels, masks, features):
    """Run the stage and return what its updator received as ``pooled``."""
    seen = {}
    original = stage.updator.forward

    def spy(pooled, k):
        seen["pooled"] = pooled
        return original(pooled, k)

    stage.updator.forward = spy
    stage(kernels, masks, features)
    return seen["pooled"]


def planted_inputs():
    g = torch.Generator().manual_seed(1)
    kernels = torch.randn(1, 3, 8, generator=g)
    masks = torch.randn(1, 3, 4, 5, generator=g) * 3
    features = torch.randn(1, 8, 4, 5, generator=g)
    return kernels, masks, features


def test_soft_grouping_sums_sigmoid_weighted_features():
    stage, _ = stage_with(**LEGACY)
    kernels, masks, features = planted_inputs()
    pooled = captured_pooled(stage, kernels, masks, features)
    expected = torch.einsum("bnhw,bdhw->bnd", masks.sigmoid(), features)
    assert torch.allclose(pooled, expected, atol=1e-5)


def test_hard_grouping_sums_features_inside_binary_masks_and_blocks_their_gradient():
    stage, _ = stage_with(**{**LEGACY, "knet_hard_masks": True})
    kernels, masks, features = planted_inputs()
    masks.requires_grad_(True)
    features.requires_grad_(True)
    pooled = captured_pooled(stage, kernels, masks, features)
    expected = torch.einsum("bnhw,bdhw->bnd", (masks > 0).float(), features)
    assert torch.allclose(pooled, expected, atol=1e-5)
    pooled.sum().backward()
    assert features.grad is not None
    assert masks.grad is None or torch.count_nonzero(masks.grad) == 0
    soft, _ = stage_with(**LEGACY)
    masks.grad = None
    captured_pooled(soft, kernels, masks, features).sum().backward()
    assert torch.count_nonzero(masks.grad) > 0  # the soft masks pass gradient


def test_feature_transform_maps_features_for_grouping_and_new_masks():
    stage, _ = stage_with(knet_feature_transform=True, knet_hard_masks=True)
    kernels, masks, features = planted_inputs()
    conv = stage.feature_transform
    assert conv is not None and conv.kernel_size == (1, 1)
    transformed = F.conv2d(features, conv.weight, conv.bias)
    pooled = captured_pooled(stage, kernels, masks, features)
    assert torch.allclose(pooled, torch.einsum("bnhw,bdhw->bnd", (masks > 0).float(),
                                               transformed), atol=1e-5)
    new_kernels, _, new_masks = stage(kernels, masks, features)
    mask_kernels = stage.mask_kernel(stage.mask_fcs(new_kernels))
    assert torch.allclose(new_masks, torch.einsum("bnd,bdhw->bnhw", mask_kernels, transformed),
                          atol=1e-5)
    plain, _ = stage_with(**LEGACY)
    assert plain.feature_transform is None


@pytest.mark.parametrize("gate_relu", [True, False])
def test_gated_update_matches_the_formula(gate_relu):
    torch.manual_seed(0)
    up = KernelUpdator(6, gate_relu=gate_relu).eval()
    g = torch.Generator().manual_seed(2)
    pooled, kernels = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    u_in, u_out = F.linear(pooled, up.update_proj.weight, up.update_proj.bias).split(6, -1)
    k_in, k_out = F.linear(kernels, up.kernel_proj.weight, up.kernel_proj.bias).split(6, -1)
    gate = u_in * k_in

    def ln(x, norm):
        return F.layer_norm(x, (6,), norm.weight, norm.bias)

    u_gate = ln(F.linear(gate, up.update_gate.weight, up.update_gate.bias), up.update_gate_norm)
    k_gate = ln(F.linear(gate, up.kernel_gate.weight, up.kernel_gate.bias), up.kernel_gate_norm)
    u_branch, k_branch = ln(u_out, up.update_norm), ln(k_out, up.kernel_norm)
    if gate_relu:
        u_branch, k_branch = u_branch.relu(), k_branch.relu()
    fused = u_gate.sigmoid() * u_branch + k_gate.sigmoid() * k_branch
    lin, norm = up.out[0], up.out[1]
    expected = ln(F.linear(fused, lin.weight, lin.bias), norm).relu()
    assert torch.allclose(up(pooled, kernels), expected, atol=1e-5)


def test_gate_relu_changes_the_update():
    torch.manual_seed(0)
    with_relu = KernelUpdator(6, gate_relu=True).eval()
    without = KernelUpdator(6, gate_relu=False).eval()
    without.load_state_dict(with_relu.state_dict())
    x = torch.randn(1, 5, 6)
    assert not torch.allclose(with_relu(x, x), without(x, x))


@pytest.mark.parametrize("std", [None, 1.0, 0.2])
def test_initial_kernel_std(std):
    cfg = model_config("tiny", hidden_dim=64, num_kernels=200, num_heads=4, knet_init_std=std)
    torch.manual_seed(0)
    weight = KNetDecoder(cfg).init_kernels.weight
    expected = 64 ** -0.5 if std is None else std
    assert abs(weight.std().item() / expected - 1) < 0.05


def test_bad_init_std_is_refused():
    with pytest.raises(ValueError, match="knet_init_std"):
        model_config("tiny", knet_init_std=0.0)


def test_configs_stored_without_the_options_keep_the_old_decoder():
    """A checkpoint's model config written before the options existed builds the decoder it
    was trained with (soft grouping, D^-0.5 kernels, ReLU gates, no transform)."""
    stored = model_config("tiny").to_dict()
    names = ("knet_hard_masks", "knet_init_std", "knet_gate_relu", "knet_feature_transform",
             "mask_features_position")
    for name in names:
        stored.pop(name)
    cfg = ModelConfig.from_dict(stored)
    assert tuple(getattr(cfg, n) for n in names) == (False, None, True, False, False)
    assert dataclasses.replace(cfg) == cfg


def test_mask_features_position_adds_the_sine_map_to_p5_before_fusion():
    from collections import OrderedDict

    from uplvp_model.backbone import PixelDecoder
    from uplvp_model.position_encoding import sine_position_map

    torch.manual_seed(0)
    plain = PixelDecoder((4, 8, 8, 16), 8, 4).eval()
    placed = PixelDecoder((4, 8, 8, 16), 8, 4, position=True).eval()
    placed.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(1, c, 32 // s, 48 // s, generator=g)
             for c, s in zip((4, 8, 8, 16), (1, 2, 4, 8))]
    with torch.no_grad():
        pyramid = list(plain.fpn(OrderedDict((f"c{i + 2}", f) for i, f in enumerate(feats)))
                       .values())
        pyramid[-1] = pyramid[-1] + sine_position_map(4, 6, 8)
        fused = pyramid[0] + sum(F.interpolate(p, size=(32, 48), mode="bilinear",
                                               align_corners=False) for p in pyramid[1:])
        expected = plain.mask_head(fused)
        got, levels = placed(feats)
        base, base_levels = plain(feats)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(levels, base_levels))  # P5..P2 unchanged
    with pytest.raises(ValueError, match="mask_features_position"):
        model_config("tiny", hidden_dim=30, num_heads=2, mask_features_position=True)


def test_defaults_are_k_nets_reference_grouping_and_update():
    """New configs (every preset) build K-Net's reference decoder: binary-mask grouping, a
    feature transform per stage, no ReLU on the gated branches, initial kernels of std 1."""
    for preset in ("tiny", "small", "base"):
        cfg = model_config(preset)
        assert (cfg.knet_hard_masks, cfg.knet_feature_transform, cfg.knet_gate_relu,
                cfg.knet_init_std) == (True, True, False, 1.0)
    stage, _ = stage_with()
    kernels, masks, features = planted_inputs()
    conv = stage.feature_transform
    transformed = F.conv2d(features, conv.weight, conv.bias)
    pooled = captured_pooled(stage, kernels, masks, features)
    assert torch.allclose(pooled, torch.einsum("bnhw,bdhw->bnd", (masks > 0).float(),
                                               transformed), atol=1e-5)
    assert stage.updator.gate_relu is False
