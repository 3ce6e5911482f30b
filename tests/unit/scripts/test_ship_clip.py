"""tools/ship_clip.py: a finished train_clip.py run becomes a shipped model that loads by
name with its weights rounded to half precision, a card that validates, and the command that
reproduces it."""
from __future__ import annotations

import json

import pytest
import torch

import importlib
from uplvp_model.proposal import clip_dense, shipped

tc = importlib.import_module("tools.train_clip")
ship_clip = importlib.import_module("tools.ship_clip")

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_a_trained_run_ships_and_loads_by_name(tmp_path, monkeypatch):
    config = tmp_path / "tiny-ship.json"
    config.write_text(json.dumps(TINY_CONFIG))
    run = tmp_path / "run"
    tc.train(tc.parse_args(["--config", str(config), "--out", str(run), "--steps", "2",
                            "--train-images", "8", "--eval-images", "4", "--batch-size", "4",
                            "--warmup", "1", "--workers", "0", "--threads", "1",
                            "--base-size", "64", "--lr", "0.001"]))
    dest = tmp_path / "shipped"
    folder = ship_clip.ship(run, "tiny-ship", dest)
    monkeypatch.setattr(shipped, "SHIPPED_DIR", dest)
    model = shipped.shipped_model("tiny-ship")  # card validated, sha256 checked
    card = model.card
    assert card["precision"] == "fp16" and card["sha256"] == shipped.file_sha256(model.weights)
    assert card["vocabulary"] == [c.name for c in tc.CATEGORIES]
    # the command names exactly the settings that differ from train_clip.py's defaults
    assert card["command"] == (
        f".venv/bin/python -m tools.train_clip --config {config} --train-images 8 "
        "--base-size 64 --steps 2 --batch-size 4 --lr 0.001 --warmup 1")
    assert card["data_seeds"] == {"seed": 0, "train_split": "clip-train", "train_images": 8,
                                  "heldout_split": "clip-heldout", "heldout_images": 4}
    metrics = json.loads((run / "metrics.json").read_text())
    assert card["held_out"]["zero_shot_map"] == round(metrics["trained"]["mAP"], 4)
    assert card["held_out"]["dense_patch_accuracy"] == round(
        metrics["trained"]["patch_acc_objects"], 4)
    assert json.loads((folder / shipped.CONFIG_FILE).read_text()) == {"model_cfg": TINY_CONFIG}
    # loaded by name: the trained weights rounded to fp16, nothing else
    trained = torch.load(run / "tiny-ship.pt", weights_only=True)
    loaded = clip_dense.load_clip("tiny-ship", None).model.state_dict()
    assert loaded.keys() == trained.keys()
    for key, value in trained.items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(loaded[key].to(expected.dtype), expected), key


def test_an_unfinished_run_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="has not finished training"):
        ship_clip.ship(tmp_path, "x", tmp_path / "dest")
