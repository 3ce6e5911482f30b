"""Strict initialisation: a backbone or --init checkpoint of another depth or width is one
error line (exit 2) unless --allow-partial-init; the class head is the only thing fine-tuning
re-initialises silently."""
from __future__ import annotations

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from pipeline.errors import InputError
from stages.cli import app
from stages.finetune import initialise_from
from uplvp_model.backbone import ResNetBackbone
from uplvp_model.checkpoint import load_backbone_checkpoint
from uplvp_model.config import model_config
from uplvp_model.model import build_model
from tests.helpers.training import pretrained_checkpoint


def test_resnet18_weights_do_not_fit_a_resnet50_backbone(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    body = ResNetBackbone(50).body
    with pytest.raises(ValueError, match=r"r18.pth: backbone checkpoint does not fit the "
                                         r"model's backbone: \d+ model tensors missing"):
        load_backbone_checkpoint(body, path)
    report = load_backbone_checkpoint(body, path, allow_partial=True)
    # what the issue saw as a silent half-random backbone, now only on request
    assert report.loaded and report.missing and report.skipped
    r50 = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), r50)
    with pytest.raises(ValueError, match="of another shape"):  # the other way round
        load_backbone_checkpoint(ResNetBackbone(18).body, r50)


def test_cli_refuses_a_backbone_of_another_depth_in_one_line(tiny_coco, tmp_path):
    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    config = tmp_path / "ft.yaml"
    config.write_text(f"model: {{preset: base, backbone_checkpoint: {r18}}}\n")
    result = CliRunner().invoke(app, [
        "stage", "finetune", "--train", str(tiny_coco["manifest"]), "--out",
        str(tmp_path / "run"), "--config", str(config), "--max-steps", "1", "--batch-size", "2",
        "--device", "cpu", "--num-workers", "0", "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {r18}: backbone checkpoint does "
                                                   "not fit the model's backbone: "), lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_of_another_width_is_refused_unless_partial(tmp_path):
    path, _ = pretrained_checkpoint(tmp_path, hidden_dim=32)
    model = build_model(model_config("tiny", num_classes=3, hidden_dim=48))
    with pytest.raises(InputError, match=r"--init: checkpoint does not fit the model: "
                                         r"\d+ of another shape \(first: "):
        initialise_from(model, str(path))
    report = initialise_from(model, str(path), allow_partial=True)
    assert report["loaded"] > 0 and report["skipped"]


def test_init_reinitialises_only_the_class_head_silently(tmp_path):
    path, pretrained = pretrained_checkpoint(tmp_path)
    model = build_model(model_config("tiny", num_classes=3))
    report = initialise_from(model, str(path))
    heads = set(model.class_head_keys())
    assert set(report["skipped"]) == heads and heads
    source = pretrained.state_dict()
    for key, value in model.state_dict().items():
        if key not in heads:
            assert torch.equal(value, source[key]), key
