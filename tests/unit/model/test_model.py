"""Tests for uplvp_model config, backbone, decoders and model assembly (tiny CPU configs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uplvp_model.checkpoint import load_model_state
from uplvp_model.config import MODEL_PRESETS, ModelConfig, model_config
from uplvp_model.model import QEISModel, build_model

DECODERS = ("knet", "mask2former")
OUTPUT_KEYS = {"pred_logits", "pred_masks", "kernels"}


def tiny_model(seed: int = 0, **overrides) -> QEISModel:
    torch.manual_seed(seed)
    return build_model(model_config("tiny", **overrides))


def images(batch: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- config -------------------------------------------------------------------------------


def test_presets_build_valid_configs_and_round_trip():
    for name in MODEL_PRESETS:
        cfg = model_config(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    base = model_config("base")
    assert (base.backbone, base.hidden_dim, base.num_kernels, base.num_stages) == (
        "resnet50", 256, 100, 3)
    assert model_config("small").backbone == "resnet18"
    assert model_config("tiny", num_classes=7).num_classes == 7


@pytest.mark.parametrize("overrides, message", [
    ({"backbone": "vit"}, "backbone"),
    ({"decoder": "detr"}, "decoder"),
    ({"mask_stride": 16}, "mask_stride"),
    ({"hidden_dim": 30}, "divisible"),
    ({"num_kernels": 0}, "num_kernels"),
    ({"num_feature_levels": 5}, "num_feature_levels"),
    ({"no_such_field": 1}, "no_such_field"),
])
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_config("tiny", **overrides)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="huge"):
        model_config("huge")


# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("stride", (4, 8))
def test_output_shapes(decoder, stride):
    model = tiny_model(decoder=decoder, mask_stride=stride, num_classes=3)
    cfg = model.cfg
    b, n, d = 2, cfg.num_kernels, cfg.hidden_dim
    out = model(images(b, 64), return_features=True)
    feats = out["features"]
    assert feats["mask_features"].shape == (b, d, 64 // stride, 64 // stride)
    assert [tuple(t.shape) for t in feats["multi_scale"]] == [(b, d, 2, 2), (b, d, 4, 4),
                                                              (b, d, 8, 8)]
    assert feats["prompt_features"] is feats["multi_scale"][0]
    assert feats["image_size"] == (64, 64)
    assert len(out["aux_outputs"]) == cfg.num_stages == 3
    for o in [out, *out["aux_outputs"]]:
        assert OUTPUT_KEYS <= set(o)
        assert o["pred_logits"].shape == (b, n, 4)
        assert o["pred_masks"].shape == (b, n, 64 // stride, 64 // stride)
        assert o["kernels"].shape == (b, n, d)


def test_forward_without_return_features_has_only_outputs():
    out = tiny_model()(images())
    assert set(out) == OUTPUT_KEYS | {"aux_outputs"}


def test_non_square_input_and_stage_count():
    model = tiny_model(decoder="mask2former", num_stages=5)
    out = model(images(1, 64)[:, :, :, :32].contiguous())
    assert out["pred_masks"].shape == (1, 10, 16, 8)
    assert len(out["aux_outputs"]) == 5


def test_bad_image_shape_raises():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_model()(torch.zeros(2, 1, 64, 64))


# --- kernels ------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", DECODERS)
def test_initial_kernels_are_the_parameter_repeated(decoder):
    model = tiny_model(decoder=decoder)
    kernels = model.initial_kernels(3)
    weight = model.decoder.init_kernels.weight
    assert kernels.shape == (3, 10, 32)
    assert all(torch.equal(k, weight) for k in kernels)
    kernels.add_(1.0)  # a copy: editing it leaves the parameter untouched
    assert not torch.equal(kernels[0], weight)
    model.initial_kernels(2).sum().backward()
    assert torch.equal(weight.grad, torch.full_like(weight, 2.0))


@pytest.mark.parametrize("decoder", DECODERS)
def test_decode_uses_the_kernels_passed_in(decoder):
    model = tiny_model(decoder=decoder).eval()
    feats = model.extract_features(images())
    base = model.initial_kernels(2).detach()
    kernels = base.clone().requires_grad_(True)
    out = model.decode(feats, kernels)
    sum(o["pred_masks"].sum() + o["pred_logits"].sum()
        for o in [out, *out["aux_outputs"]]).backward()
    assert kernels.grad is not None and (kernels.grad.abs().sum(-1) > 0).all()
    assert model.decoder.init_kernels.weight.grad is None  # the learnt ones were not used

    # Changing kernel 3 of image 1 changes the stage-0 predictions of exactly that kernel.
    with torch.no_grad():
        ref = model.decode(feats, base)
        changed = base.clone()
        changed[1, 3] += torch.randn(32, generator=torch.Generator().manual_seed(5))
        new = model.decode(feats, changed)
    for key in ("pred_masks", "pred_logits"):
        diff = (ref["aux_outputs"][0][key] != new["aux_outputs"][0][key]).flatten(2).any(-1)
        expected = torch.zeros_like(diff)
        expected[1, 3] = True
        assert torch.equal(diff, expected), key
    assert not torch.allclose(ref["pred_masks"][1], new["pred_masks"][1])
    assert torch.equal(ref["pred_masks"][0], new["pred_masks"][0])  # images are independent


def test_knet_stage0_masks_are_kernel_dot_features():
    model = tiny_model(decoder="knet").eval()
    feats = model.extract_features(images())
    kernels = torch.randn(2, 10, 32)
    with torch.no_grad():
        out = model.decode(feats, kernels)
    expected = torch.einsum("bnd,bdhw->bnhw", kernels, feats["mask_features"])
    assert torch.allclose(out["aux_outputs"][0]["pred_masks"], expected, atol=1e-5)
    assert torch.equal(out["aux_outputs"][0]["kernels"], kernels)


def test_decode_rejects_wrong_kernel_shape():
    model = tiny_model()
    feats = model.extract_features(images())
    with pytest.raises(ValueError, match="kernels must be"):
        model.decode(feats, torch.zeros(2, 9, 32))


@pytest.mark.parametrize("decoder", DECODERS)
def test_same_seed_same_model_and_outputs(decoder):
    a, b = tiny_model(seed=3, decoder=decoder).eval(), tiny_model(seed=3, decoder=decoder).eval()
    with torch.no_grad():
        assert torch.equal(a(images())["pred_masks"], b(images())["pred_masks"])
        assert not torch.equal(a(images())["pred_masks"],
                               tiny_model(seed=4, decoder=decoder).eval()(images())["pred_masks"])


# --- backbone -----------------------------------------------------------------------------


def test_freeze_backbone():
    model = tiny_model(freeze_backbone=True).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    assert model.pixel_decoder.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    out = model(images())
    out["pred_masks"].sum().backward()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics unchanged
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.decoder.init_kernels.weight.grad is not None


def test_unfrozen_backbone_trains_bn():
    model = tiny_model().train()
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(images())
    assert bn.training and not torch.equal(before, bn.running_mean)


def test_build_model_loads_prefixed_backbone_checkpoint(tmp_path):
    source = tiny_model(seed=11)
    body = source.backbone.body.state_dict()
    state = {f"module.encoder_q.{k}": v for k, v in body.items()}
    state["module.encoder_q.fc.0.weight"] = torch.zeros(4, 4)
    state["module.encoder_k.0.0.weight"] = torch.zeros(1)
    state["queue"] = torch.zeros(2, 2)
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": state, "epoch": 200, "arch": "tiny"}, path)

    model = tiny_model(seed=12, backbone_checkpoint=str(path), freeze_backbone=True)
    report = model.backbone_load_report
    assert report.loaded == sorted(body)
    assert report.missing == report.unexpected == report.skipped == []
    assert report.ignored == ["module.encoder_k.0.0.weight", "module.encoder_q.fc.0.weight",
                              "queue"]
    # with a checkpoint the backbone's BatchNorm is frozen (backbone_norm auto): same values,
    # without BatchNorm's num_batches_tracked counters
    assert model.cfg.backbone_norm == "frozen"
    loaded = model.backbone.body.state_dict()
    weights = {k: v for k, v in body.items() if not k.endswith("num_batches_tracked")}
    assert sorted(loaded) == sorted(weights)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_build_model_missing_backbone_checkpoint_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        tiny_model(backbone_checkpoint=str(tmp_path / "nope.pth"))


# --- class head ---------------------------------------------------------------------------


@pytest.mark.parametrize("decoder, expected_keys", [
    ("knet", ["decoder.init_class_head.bias", "decoder.init_class_head.weight"]
     + [f"decoder.stages.{i}.class_head.{p}" for i in range(3) for p in ("bias", "weight")]),
    ("mask2former", ["decoder.class_head.bias", "decoder.class_head.weight"]),
])
def test_reset_class_head(decoder, expected_keys):
    model = tiny_model(decoder=decoder)
    assert model.class_head_keys() == expected_keys
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_class_head(5)
    after = model.state_dict()
    assert model.cfg.num_classes == 5
    assert model.class_head_keys() == expected_keys
    for key in before:
        if key in expected_keys:
            assert after[key].shape[0] == 6
        else:
            assert torch.equal(before[key], after[key]), key
    out = model(images())
    assert all(o["pred_logits"].shape == (2, 10, 6) for o in [out, *out["aux_outputs"]])
    # a fresh 5-class model accepts this state exactly
    report = load_model_state(tiny_model(decoder=decoder, num_classes=5), model.state_dict(),
                              skip_mismatched=False)
    assert report.missing == report.unexpected == report.skipped == []


# --- learning -----------------------------------------------------------------------------


def synthetic_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """A 64x64 image with a red square, a green disk and a blue square on grey:
    (normalised image [1, 3, 64, 64], masks bool [3, 64, 64])."""
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    masks = torch.stack([
        (yy >= 6) & (yy < 28) & (xx >= 8) & (xx < 30),
        (yy - 46) ** 2 + (xx - 18) ** 2 <= 11 ** 2,
        (yy >= 36) & (yy < 58) & (xx >= 38) & (xx < 60),
    ])
    image = torch.full((3, 64, 64), 0.5)
    for mask, colour in zip(masks, ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))):
        image[:, mask] = torch.tensor(colour)[:, None]
    return ((image - 0.5) / 0.25)[None], masks


def identity_loss(outputs: dict, targets: torch.Tensor) -> torch.Tensor:
    """BCE + dice on kernels 0..M-1 against the M targets (resized to mask resolution), and
    cross-entropy: kernels 0..M-1 -> class 0, the others -> no object."""
    m = targets.shape[0]
    logits = outputs["pred_masks"][0, :m]
    target = F.interpolate(targets[None].float(), size=logits.shape[-2:], mode="area")[0]
    prob = logits.sigmoid().flatten(1)
    flat = target.flatten(1)
    dice = 1 - (2 * (prob * flat).sum(1) + 1) / (prob.sum(1) + flat.sum(1) + 1)
    cls_logits = outputs["pred_logits"][0]
    labels = torch.full((cls_logits.shape[0],), cls_logits.shape[1] - 1)
    labels[:m] = 0
    return (F.binary_cross_entropy_with_logits(logits, target) + dice.mean()
            + F.cross_entropy(cls_logits, labels))


@pytest.mark.parametrize("decoder", DECODERS)
def test_tiny_model_overfits_one_image(decoder):
    image, gt = synthetic_scene()
    model = tiny_model(seed=0, decoder=decoder)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(100):
        out = model(image)
        loss = sum(identity_loss(o, gt) for o in [out, *out["aux_outputs"]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(image)
    masks = F.interpolate(out["pred_masks"][:, :3], size=(64, 64), mode="bilinear")[0] > 0
    iou = (masks & gt).flatten(1).sum(1) / (masks | gt).flatten(1).sum(1)
    assert (iou > 0.9).all(), iou
    assert (out["pred_logits"][0].argmax(-1) == torch.tensor([0] * 3 + [1] * 7)).all()
