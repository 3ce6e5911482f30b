"""Registries (decoders, proposers) and presets as data files: names come from one place."""
from __future__ import annotations

import json

import pytest

from stages.training_setup import ModelSection
from uplvp_model import config as config_module
from uplvp_model.config import MODEL_PRESETS, model_config
from uplvp_model.criterion import reference_mask_weights
from uplvp_model.decoders import DECODERS, build_decoder
from uplvp_model.proposal.factory import PROPOSERS, build_proposer
from uplvp_model.registry import Registry


def test_registry_registers_gets_and_refuses():
    things = Registry("thing")

    @things.register("a", colour="red")
    class A:
        pass

    assert things.names() == ("a",) and things.get("a") is A and "a" in things
    assert things.info("a") == {"colour": "red"}
    things.info("a")["colour"] = "blue"  # a copy: the entry does not change
    assert things.info("a") == {"colour": "red"}
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        things.register("a")(A)
    with pytest.raises(ValueError, match="unknown thing 'b'; choose one of a"):
        things.get("b")


def test_decoders_are_registered_with_their_reference_loss_weights():
    assert DECODERS.names() == ("knet", "mask2former")
    assert reference_mask_weights("knet") == {"bce": 1.0, "dice": 4.0}
    assert reference_mask_weights("mask2former") == {"bce": 5.0, "dice": 5.0}
    for name in DECODERS.names():
        decoder = build_decoder(model_config("tiny", decoder=name))
        assert isinstance(decoder, DECODERS.get(name))
    with pytest.raises(ValueError, match="decoder must be one of"):
        model_config("tiny", decoder="yolo")
    with pytest.raises(ValueError, match="unknown decoder 'yolo'"):
        ModelSection(decoder="yolo")


def test_proposers_are_registered_and_built_by_name():
    assert set(PROPOSERS.names()) == {"classical", "clip", "freemask", "maskcut"}
    proposer = build_proposer("classical")
    assert isinstance(proposer, PROPOSERS.get("classical")) and proposer.name == "classical"
    with pytest.raises(ValueError, match="unknown proposer 'sam'"):
        build_proposer("sam")


def test_presets_are_the_files_of_model_configs():
    files = sorted(p.stem for p in config_module.PRESET_DIR.glob("*.json"))
    assert sorted(MODEL_PRESETS) == files == ["base", "lite", "small", "tiny"]
    for name in files:
        stored = json.loads((config_module.PRESET_DIR / f"{name}.json").read_text())
        assert stored.pop("description")
        built = model_config(name).to_dict()
        for key, value in stored.items():
            assert built[key] == (tuple(value) if isinstance(value, list) else value), (name, key)


def test_a_new_preset_file_is_a_new_preset(tmp_path, monkeypatch):
    (tmp_path / "wide.json").write_text(json.dumps(
        {"description": "planted", "backbone": "tiny", "hidden_dim": 48, "num_kernels": 7,
         "num_heads": 4, "ffn_dim": 96}))
    monkeypatch.setattr(config_module, "PRESET_DIR", tmp_path)
    presets = config_module._read_presets()
    assert list(presets) == ["wide"] and "description" not in presets["wide"]
    monkeypatch.setattr(config_module, "MODEL_PRESETS", presets)
    cfg = config_module.model_config("wide")
    assert (cfg.backbone, cfg.hidden_dim, cfg.num_kernels, cfg.ffn_dim) == ("tiny", 48, 7, 96)
