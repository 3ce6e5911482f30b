"""Shipped language-vision models, selected by name (uplvp_model.proposal.shipped): the card is
validated, the weights' sha256 checked, and load_clip builds the named model from its folder
with exactly the stored weights."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import save_file

from uplvp_model.proposal import clip_dense, shipped

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def ship(root, name="toy-vit", seed=3):
    """A shipped-model folder as the package holds one: config, fp16 weights, card."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / shipped.CONFIG_FILE).write_text(json.dumps({"model_cfg": TINY_CFG}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CFG)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / shipped.WEIGHTS_FILE))
    card = {"format_version": 1, "description": "a test model", "weights": shipped.WEIGHTS_FILE,
            "sha256": shipped.file_sha256(folder / shipped.WEIGHTS_FILE), "precision": "fp16",
            "vocabulary": ["circle", "square"], "command": "none", "data_seeds": [1]}
    (folder / shipped.CARD_FILE).write_text(yaml.safe_dump(card))
    return folder, state


def test_a_shipped_model_loads_by_name_with_exactly_its_weights(tmp_path, monkeypatch):
    folder, state = ship(tmp_path)
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    assert shipped.shipped_names() == ["toy-vit"] and shipped.is_shipped("toy-vit")
    assert not shipped.is_shipped("ViT-B-16")
    assert shipped.shipped_model("toy-vit").vocabulary == ["circle", "square"]
    loaded = clip_dense.load_clip("toy-vit", None)
    assert loaded.pretrained and str(folder) in loaded.source
    got = loaded.model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():  # fp16 on disk, fp32 in the model: the same numbers
        assert torch.equal(got[key], value.float()), key


def test_a_damaged_or_missing_weight_file_is_one_error_line(tmp_path, monkeypatch):
    folder, _ = ship(tmp_path)
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    weights = folder / shipped.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the card") as err:
        clip_dense.load_clip("toy-vit", None)
    assert "\n" not in str(err.value)
    weights.unlink()
    with pytest.raises(ValueError, match="are missing from this installation"):
        shipped.shipped_model("toy-vit")
    with pytest.raises(ValueError, match=r"no shipped CLIP model 'other' \(shipped: toy-vit\)"):
        shipped.shipped_model("other")


def test_a_card_is_validated(tmp_path):
    folder, _ = ship(tmp_path)
    card_path = folder / shipped.CARD_FILE
    card = yaml.safe_load(card_path.read_text())
    for change, message in [({"format_version": 2}, "format_version 2 is not 1"),
                            ({"weights": "model.pt"}, "weights must be"),
                            ({"sha256": None, "command": None}, None)]:
        broken = {**card, **change}
        if message is None:  # keys removed
            broken = {k: v for k, v in card.items() if k not in change}
            message = "missing keys sha256, command"
        card_path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ValueError, match=message):
            shipped.shipped_model("toy-vit", root=tmp_path)
