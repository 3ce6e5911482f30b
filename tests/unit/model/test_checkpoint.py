"""Tests for uplvp_model.checkpoint: atomic weights_only saving, partial loading reports,
backbone key mapping."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from uplvp_model.backbone import ResNetBackbone
from uplvp_model.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    load_backbone_checkpoint,
    load_model_state,
    map_backbone_keys,
    read_checkpoint,
    save_model_state,
)
from uplvp_model.config import model_config
from uplvp_model.model import build_model


def tiny(seed: int, **overrides):
    torch.manual_seed(seed)
    return build_model(model_config("tiny", **overrides))


def test_round_trip_with_weights_only(tmp_path):
    model = tiny(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(1, 3, 64, 64))["pred_masks"].sum().backward()
    optimizer.step()
    extra = {
        "step": 7,
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": [1, 2, 3], "python": (3, (1, 2), None)},
        "config": model.cfg.to_dict(),
    }
    path = tmp_path / "checkpoints" / "step-0000007.pt"
    save_model_state(path, model, extra)

    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left over
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert raw["step"] == 7 and raw["config"] == model.cfg.to_dict()
    assert torch.equal(raw["rng"]["torch"], extra["rng"]["torch"])

    payload = read_checkpoint(path)
    fresh = tiny(1)
    report = load_model_state(fresh, payload["model"])
    assert report.loaded == sorted(model.state_dict())
    assert report.missing == report.unexpected == report.skipped == []
    model.eval()
    fresh.eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(image)["pred_masks"], fresh(image)["pred_masks"])
    restored = torch.optim.AdamW(fresh.parameters(), lr=1e-4)
    restored.load_state_dict(payload["optimizer"])
    assert restored.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


@pytest.mark.parametrize("extra, where", [
    ({"rng": {"numpy": np.zeros(3)}}, r"extra\['rng'\]\['numpy'\]: numpy.ndarray"),
    ({"lr": np.float64(0.1)}, r"extra\['lr'\]: numpy.float64"),
    ({"items": [1, object()]}, r"extra\['items'\]\[1\]: builtins.object"),
    ({"model": {}}, "reserved key"),
])
def test_save_rejects_non_plain_extra_and_keeps_old_file(tmp_path, extra, where):
    path = tmp_path / "ckpt.pt"
    save_model_state(path, tiny(0), {"step": 1})
    before = path.read_bytes()
    with pytest.raises(ValueError, match=where):
        save_model_state(path, tiny(0), extra)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_class_count_mismatch_skips_exactly_the_class_heads(tmp_path):
    pretrained = tiny(0, decoder="knet", num_classes=1)
    save_model_state(tmp_path / "pre.pt", pretrained, {})
    finetune = tiny(1, decoder="knet", num_classes=80)
    state = read_checkpoint(tmp_path / "pre.pt")["model"]
    heads_before = {k: finetune.state_dict()[k].clone() for k in finetune.class_head_keys()}

    report = load_model_state(finetune, state)
    assert report.skipped == finetune.class_head_keys() == [
        "decoder.init_class_head.bias", "decoder.init_class_head.weight",
        "decoder.stages.0.class_head.bias", "decoder.stages.0.class_head.weight",
        "decoder.stages.1.class_head.bias", "decoder.stages.1.class_head.weight",
        "decoder.stages.2.class_head.bias", "decoder.stages.2.class_head.weight",
    ]
    assert report.skipped_shapes["decoder.stages.0.class_head.weight"] == ((2, 32), (81, 32))
    assert report.loaded == sorted(set(state) - set(report.skipped))
    assert report.missing == report.unexpected == []
    after = finetune.state_dict()
    assert all(torch.equal(after[k], v) for k, v in heads_before.items())
    assert torch.equal(after["decoder.init_kernels.weight"], state["decoder.init_kernels.weight"])
    assert "skipped: decoder.stages.0.class_head.weight checkpoint [2, 32] vs model [81, 32]" in (
        report.summary())

    with pytest.raises(ValueError, match="mismatched shapes: decoder.init_class_head.bias"):
        load_model_state(tiny(2, decoder="knet", num_classes=80), state, skip_mismatched=False)


def test_missing_and_unexpected_keys_are_reported():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = dict(model.state_dict())
    del state["1.bias"]
    state["2.weight"] = torch.zeros(1)
    report = load_model_state(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), state)
    assert report.loaded == ["0.bias", "0.weight", "1.weight"]
    assert report.missing == ["1.bias"]
    assert report.unexpected == ["2.weight"]
    assert report.skipped == []


def test_read_checkpoint_validates(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_checkpoint(tmp_path / "absent.pt")
    torch.save({"format_version": 99, "model": {}}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format_version 99"):
        read_checkpoint(tmp_path / "future.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a uplvp checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")


# --- backbone weights ---------------------------------------------------------------------


def test_map_backbone_keys_moco():
    w = torch.zeros(1)
    mapped, ignored = map_backbone_keys({
        "module.encoder_q.conv1.weight": w,
        "module.encoder_q.layer1.0.bn1.running_mean": w,
        "module.encoder_q.fc.0.weight": w,
        "module.encoder_k.conv1.weight": w,
        "module.queue": w,
        "module.queue_ptr": w,
    })
    assert sorted(mapped) == ["conv1.weight", "layer1.0.bn1.running_mean"]
    assert ignored == ["module.encoder_k.conv1.weight", "module.encoder_q.fc.0.weight",
                       "module.queue", "module.queue_ptr"]


def test_map_backbone_keys_plain_torchvision_and_uplvp():
    w = torch.zeros(1)
    mapped, ignored = map_backbone_keys({"conv1.weight": w, "fc.weight": w, "fc.bias": w,
                                         "meta": 3})
    assert list(mapped) == ["conv1.weight"] and ignored == ["fc.bias", "fc.weight", "meta"]
    mapped, ignored = map_backbone_keys({"backbone.body.conv1.weight": w,
                                         "decoder.init_kernels.weight": w})
    assert list(mapped) == ["conv1.weight"] and ignored == ["decoder.init_kernels.weight"]


def test_load_torchvision_resnet18_with_detector_prefix(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None).state_dict()
    state = {f"backbone.{k}": v for k, v in source.items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)
    state["backbone.layer4.1.bn2.weight"] = torch.zeros(7)  # wrong shape
    del state["backbone.layer1.0.conv1.weight"]
    path = tmp_path / "r18.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, path)

    backbone = ResNetBackbone(18)
    with pytest.raises(ValueError) as err:  # strict by default: one missing, one misshapen
        load_backbone_checkpoint(backbone.body, path)
    assert str(err.value) == (
        f"{path}: backbone checkpoint does not fit the model's backbone: 1 model tensors missing "
        "(first: layer1.0.conv1.weight), 1 of another shape (first: layer4.1.bn2.weight "
        "checkpoint [7] vs model [512]); another depth or width? (allow_partial_init loads "
        "only what fits)")
    report = load_backbone_checkpoint(backbone.body, path, allow_partial=True)
    assert report.ignored == ["backbone.fc.bias", "backbone.fc.weight",
                              "neck.lateral_convs.0.conv.weight"]
    assert report.missing == ["layer1.0.conv1.weight"]
    assert report.skipped == ["layer4.1.bn2.weight"]
    assert report.unexpected == []
    expected = sorted(k for k in source if not k.startswith("fc.")
                      and k not in ("layer1.0.conv1.weight", "layer4.1.bn2.weight"))
    assert report.loaded == expected
    loaded = backbone.body.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in expected)


def test_load_backbone_checkpoint_with_nothing_matching_raises(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="r50.pth: no tensor"):
        load_backbone_checkpoint(ResNetBackbone(18).body, path)
