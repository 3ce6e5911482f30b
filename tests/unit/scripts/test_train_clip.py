"""tools/train_clip.py: captions from annotations, the retrieval metrics on planted inputs,
the dense training path, and a tiny end-to-end run whose checkpoint ``load_clip`` loads."""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.synth import CATEGORIES, synth_example
from stages.propose import read_vocabulary
from uplvp_model.proposal.clip_dense import dense_clip_features, load_clip

import importlib


tc = importlib.import_module("tools.train_clip")
Obj = tc.SceneObject

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_caption_of_a_planted_annotation():
    objects = [Obj("star", "red", "medium"), Obj("disk", "blue", "small"), Obj("disk", "blue", "small")]
    assert tc.caption(objects) == "a photo of a red star and two small blue disks."


def test_caption_grammar_counts_and_shared_attributes():
    objects = [
        Obj("hexagon", "orange", "large"),
        Obj("cross", "green", "small"),
        Obj("cross", "cyan", "small"),  # the crosses differ in colour: no colour word
        Obj("disk", "red", "small"),
        Obj("disk", "red", "large"),  # ... the disks in size: no size word
        Obj("disk", "red", "medium"),
    ]
    assert tc.caption(objects, "there: {}") == (
        "there: a large orange hexagon, two small crosses and three red disks")
    assert tc.caption(objects, "{}", colour=False, size=False) == "a hexagon, two crosses and three disks"
    assert tc.caption([Obj("horseshoe", "orange", "medium")], "{}.") == "an orange horseshoe."
    assert tc.caption([], "a photo of {}.") == "a photo of an empty background."


def test_random_caption_is_a_function_of_its_generator():
    objects = [Obj("star", "red", "large"), Obj("triangle", "yellow", "small")]
    first = [tc.random_caption(objects, np.random.default_rng(5)) for _ in range(3)]
    assert len(set(first)) == 1
    many = {tc.random_caption(objects, np.random.default_rng(s)) for s in range(40)}
    assert len(many) > 5  # templates, orders and dropped words vary
    assert all("star" in c and "triangle" in c for c in many)


def test_colour_and_size_words():
    assert [tc.colour_word(h) for h in (0, 14, 30, 60, 120, 180, 230, 270, 300, 350, 360 + 30)] == [
        "red", "red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "red", "orange"]
    image = np.zeros((20, 20, 3), np.uint8)
    image[:] = np.round(np.array(colorsys.hsv_to_rgb(200 / 360, 0.8, 0.8)) * 255)
    image[:, 10:] = np.round(np.array(colorsys.hsv_to_rgb(200 / 360, 0.3, 0.5)) * 255)  # a shade
    mask = np.ones((20, 20), bool)
    assert tc.object_hue(image, mask) == pytest.approx(200, abs=1.0)
    square = np.zeros((100, 200), bool)
    square[10:20, 10:20] = True  # half extent 5 px / 100 = 0.05
    assert tc.size_class(square) == "small"
    square[10:34, 10:20] = True  # 12 / 100
    assert tc.size_class(square) == "medium"
    square[10:42, 10:20] = True  # 16 / 100: the generator's large boundary
    assert tc.size_class(square) == "large"


def test_scene_objects_follow_the_annotations():
    image, instances = synth_example(0, "clip-test", 3)
    scene = tc.make_scene(image, instances)
    names = {c.id: c.name for c in CATEGORIES}
    assert [o.name for o in scene.objects] == [names[cid] for cid, _ in instances]
    assert list(scene.category) == [cid - 1 for cid, _ in instances]
    for k, (_, mask) in enumerate(instances, start=1):
        assert np.array_equal(scene.labels == k, mask)
    assert all(o.colour in tc.COLOUR_WORDS and o.size in ("small", "medium", "large")
               for o in scene.objects)


def test_average_precision_on_planted_rankings():
    positive = np.array([True, False, True, False])
    assert tc.average_precision(np.array([4.0, 1.0, 3.0, 2.0]), positive) == 1.0
    # positives ranked 1st and 3rd: (1/1 + 2/3) / 2
    assert tc.average_precision(np.array([4.0, 3.0, 2.0, 1.0]), positive) == pytest.approx(5 / 6)
    # positives ranked 2nd and 4th: (1/2 + 2/4) / 2
    assert tc.average_precision(np.array([3.0, 4.0, 1.0, 2.0]), positive) == pytest.approx(0.5)
    assert np.isnan(tc.average_precision(np.array([1.0, 2.0]), np.array([False, False])))
    scores = np.array([[4.0, 4.0], [3.0, 3.0], [2.0, 2.0], [1.0, 1.0]])
    labels = np.array([[True, False], [False, False], [True, False], [False, True]])
    m_ap, per_class = tc.mean_average_precision(scores, labels)
    assert per_class == pytest.approx([5 / 6, 1 / 4])
    assert m_ap == pytest.approx((5 / 6 + 1 / 4) / 2)


def test_recall_at_k_and_its_chance_on_planted_similarities():
    similarity = np.array([
        [0.9, 0.1, 0.0],  # image 0: its own caption first -> hit
        [0.0, 0.2, 0.5],  # image 1: caption 2 first -> miss at 1, hit at 2
        [0.1, 0.0, 0.3],  # image 2: hit
    ])
    captions = ["a", "b", "c"]
    assert tc.recall_at_k(similarity, captions, 1) == pytest.approx(2 / 3)
    assert tc.recall_at_k(similarity, captions, 2) == 1.0
    # an identical caption counts: image 1 ranks caption 2 first and shares its text
    assert tc.recall_at_k(similarity, ["a", "b", "b"], 1) == 1.0
    assert tc.recall_chance(["a", "b", "c", "d"], 1) == pytest.approx(0.25)
    assert tc.recall_chance(["a", "a", "b", "c"], 1) == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    assert tc.recall_chance(["a", "b", "c", "d"], 2) == pytest.approx(0.5)
    assert tc.recall_chance(["a", "b", "c", "d"], 5) == 1.0  # fewer captions than k


def test_dihedral_gives_the_eight_symmetries():
    array = np.arange(6).reshape(2, 3)
    variants = [tc.dihedral(array, k) for k in range(8)]
    assert np.array_equal(variants[0], array)
    assert len({v.tobytes() + bytes(v.shape) for v in variants}) == 8


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-train-clip.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def test_dense_training_path_equals_the_proposer_features(tiny_config):
    """The value-path features the dense term pools are those ``dense_clip_features`` gives."""
    model, tokenizer, _, mean, std = tc.build_model(tiny_config, 0)
    scenes = [tc.make_scene(*synth_example(0, "clip-test", i, 64)) for i in range(3)]
    batch = tc.make_batch(scenes, [0, 3, 5], np.random.default_rng(0), 32, 8, mean, std)
    assert len(batch.captions) == 3
    assert batch.dense_weights.shape == (len(batch.dense_captions), 16)
    assert torch.all(batch.dense_weights.sum(dim=1) > 0)
    kept = {}
    hook = model.visual.transformer.resblocks[-1].register_forward_pre_hook(
        lambda module, args: kept.__setitem__("x", args[0]))
    with torch.no_grad():
        model.encode_image(batch.images)
        hook.remove()
        tokens = tc.dense_tokens(model.visual, kept["x"])  # [B, T, E]
        expected = dense_clip_features(model, batch.images)  # [B, E, 4, 4]
    torch.testing.assert_close(tokens.transpose(1, 2).reshape(expected.shape), expected)
    global_loss, dense_loss = tc.training_losses(model, tokenizer, batch, tc.ClipLoss())
    assert torch.isfinite(global_loss) and torch.isfinite(dense_loss)


def _tiny_args(config: Path, out: Path) -> list[str]:
    return ["--config", str(config), "--out", str(out), "--steps", "3", "--train-images", "12",
            "--eval-images", "6", "--batch-size", "4", "--warmup", "1", "--workers", "0",
            "--threads", "1", "--log-every", "1", "--base-size", "64"]


def test_tiny_run_writes_a_checkpoint_that_load_clip_loads(tiny_config, tmp_path, capsys):
    result = tc.train(tc.parse_args(_tiny_args(tiny_config, tmp_path / "run")))
    out = tmp_path / "run"
    checkpoint = out / "tiny-train-clip.pt"
    config_copy = out / "tiny-train-clip.json"
    assert checkpoint.is_file() and config_copy.is_file()
    assert json.loads(config_copy.read_text()) == TINY_CONFIG
    assert read_vocabulary(out / "vocabulary.txt") == [c.name for c in CATEGORIES]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3]
    for key in ("mAP", "mAP_chance", "R@1", "R@1_chance", "patch_acc_objects"):
        assert 0 <= metrics["trained"][key] <= 1
    printed = capsys.readouterr().out
    assert "step 3/3 loss" in printed and "s/step elapsed" in printed

    loaded = load_clip(str(config_copy), str(checkpoint))
    assert loaded.pretrained and loaded.source == str(checkpoint)
    trained = result["model"].state_dict()
    state = loaded.model.state_dict()
    assert state.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
    random_init = load_clip(str(config_copy), None).model.state_dict()
    assert not torch.equal(random_init["visual.proj"], state["visual.proj"])

    again = tc.train(tc.parse_args(_tiny_args(tiny_config, tmp_path / "again")))
    for key, value in again["model"].state_dict().items():  # seeded: the same weights
        assert torch.equal(value, trained[key]), key


def test_a_stopped_and_resumed_run_ends_with_the_uninterrupted_weights(tiny_config, tmp_path):
    args = _tiny_args(tiny_config, tmp_path / "whole") + ["--steps", "4", "--eval-images", "0",
                                                          "--checkpoint-every", "1"]
    whole = tc.train(tc.parse_args(args))["model"].state_dict()
    split = [a if a != str(tmp_path / "whole") else str(tmp_path / "split") for a in args]
    first = tc.train(tc.parse_args(split + ["--stop-after", "2"]))
    assert (tmp_path / "split" / tc.TRAIN_STATE_FILE).is_file()
    assert not (tmp_path / "split" / "tiny-train-clip.pt").exists()  # not finished
    assert not torch.equal(first["model"].state_dict()["visual.proj"], whole["visual.proj"])
    resumed = tc.train(tc.parse_args(split + ["--resume"]))
    for key, value in resumed["model"].state_dict().items():
        assert torch.equal(value, whole[key]), key
    history = json.loads((tmp_path / "split" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match=r"other settings \(lr\)"):
        tc.train(tc.parse_args(split + ["--resume", "--lr", "0.5"]))
