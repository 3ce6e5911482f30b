"""experiments/pretrain_probe.py: class-agnostic ground truth, best-IoU statistics, loading a
pre-training checkpoint, and the script end to end on tiny generated data."""
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.errors import InputError
from pipeline.synth import write_synth_dataset
from uplvp_model.checkpoint import save_model_state
from uplvp_model.config import model_config
from uplvp_model.model import build_model
from uplvp_model.pretraining import PromptedModel
from uplvp_model.prompts import PromptEncoder

import importlib


probe = importlib.import_module("experiments.pretrain_probe")


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def test_class_agnostic_puts_every_annotation_in_category_1_and_copies():
    coco = {"images": [{"id": 1}], "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
            "annotations": [{"id": 1, "category_id": 3}, {"id": 2, "category_id": 7}]}
    out = probe.class_agnostic(coco)
    assert [a["category_id"] for a in out["annotations"]] == [1, 1]
    assert [c["id"] for c in out["categories"]] == [1]
    assert [a["category_id"] for a in coco["annotations"]] == [3, 7]  # input untouched


def test_best_iou_stats_exact_values():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True  # 4 px
    wide = np.zeros((4, 4), bool)
    wide[:2, :] = True  # 8 px, holds the 4 GT px: IoU 0.5
    corner = np.zeros((4, 4), bool)
    corner[2:, 2:] = True  # disjoint: IoU 0
    coco_gt = {
        "images": [{"id": 1, "height": 4, "width": 4}, {"id": 2, "height": 4, "width": 4}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "area": 4.0, "iscrowd": 0,
             "segmentation": rle(gt)},
            {"id": 2, "image_id": 2, "category_id": 1, "area": 4.0, "iscrowd": 0,
             "segmentation": rle(gt)},
            {"id": 3, "image_id": 1, "category_id": 1, "area": 4.0, "iscrowd": 1,
             "segmentation": rle(corner)},
        ],
    }
    results = [
        {"image_id": 1, "score": 0.8, "segmentation": rle(wide)},
        {"image_id": 1, "score": 0.2, "segmentation": rle(corner)},
    ]  # image 2 has no prediction: its instance counts with IoU 0; the crowd one is ignored
    best_iou, score_best, score_other = probe.best_iou_stats(results, coco_gt)
    assert best_iou == pytest.approx(0.25)
    assert score_best == pytest.approx(0.8)
    assert score_other == pytest.approx(0.2)


def write_pretrain_checkpoint(path: Path) -> torch.nn.Module:
    cfg = model_config("tiny", num_classes=1, hidden_dim=32, num_kernels=6, num_stages=1)
    torch.manual_seed(3)
    model = build_model(cfg)
    prompted = PromptedModel(model, PromptEncoder(32, None, 8, use_embedding=False))
    save_model_state(path, prompted, {"model_config": cfg.to_dict(), "stage": "pretrain"})
    return model


def test_load_pretrained_keeps_the_model_weights_and_drops_the_prompt_encoder(tmp_path):
    model = write_pretrain_checkpoint(tmp_path / "p.pt")
    loaded = probe.load_pretrained(tmp_path / "p.pt")
    expected = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not loaded.training


def test_load_pretrained_refuses_a_checkpoint_without_model_prefix(tmp_path):
    cfg = model_config("tiny", num_classes=1, hidden_dim=32, num_kernels=6, num_stages=1)
    save_model_state(tmp_path / "f.pt", build_model(cfg), {"model_config": cfg.to_dict()})
    with pytest.raises(InputError, match="not a pre-training checkpoint"):
        probe.load_pretrained(tmp_path / "f.pt")


def test_main_prints_one_row_per_model(tmp_path, capsys):
    write_synth_dataset(tmp_path / "data", seed=0, num_unlabeled=0, num_train=1, num_val=3,
                        image_size=64, progress=False)
    write_pretrain_checkpoint(tmp_path / "p.pt")
    val = tmp_path / "data" / "val.yaml"
    assert probe.main([str(tmp_path / "p.pt"), "--data", str(val), "--short-side", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("prompt-free, class-agnostic, 3 images")
    rows = lines[2:]
    assert [r.split()[0] for r in rows] == ["scratch", str(tmp_path / "p.pt")]
    for row in rows:
        best_iou = float(row.split()[-4])
        assert 0.0 <= best_iou <= 1.0


def test_main_refuses_a_missing_checkpoint(tmp_path, capsys):
    write_synth_dataset(tmp_path / "data", seed=0, num_unlabeled=0, num_train=1, num_val=1,
                        image_size=64, progress=False)
    code = probe.main([str(tmp_path / "nope.pt"), "--data", str(tmp_path / "data" / "val.yaml")])
    assert code == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_linear_probe_finds_a_planted_category_direction_and_nothing_in_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    noise = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    planted = noise.clone()
    planted[:, :4] += 3.0 * torch.nn.functional.one_hot(labels, 4)  # category in dims 0-3
    train, test = slice(0, 120), slice(120, 200)
    accuracy = probe.linear_probe_accuracy(planted[train], labels[train], planted[test],
                                           labels[test], 4)
    assert accuracy > 0.95
    chance = probe.linear_probe_accuracy(noise[train], labels[train], noise[test], labels[test], 4)
    assert chance < 0.45  # 4 classes: 0.25 expected


def test_main_with_train_adds_the_category_probe(tmp_path, capsys):
    write_synth_dataset(tmp_path / "data", seed=0, num_unlabeled=0, num_train=3, num_val=3,
                        image_size=64, progress=False)
    write_pretrain_checkpoint(tmp_path / "p.pt")
    data = tmp_path / "data"
    assert probe.main([str(tmp_path / "p.pt"), "--data", str(data / "val.yaml"), "--train",
                       str(data / "train.yaml"), "--short-side", "64", "--no-scratch"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("catacc: category probe fitted on") and "chance 0.125" in lines[1]
    assert lines[2].split()[-2:] == ["catacc", "s"]
    accuracy = float(lines[3].split()[-2])
    assert 0.0 <= accuracy <= 1.0


def test_pooled_mask_features_average_under_each_mask(tmp_path):
    write_synth_dataset(tmp_path / "data", seed=1, num_unlabeled=0, num_train=1, num_val=2,
                        image_size=64, progress=False)
    from pipeline.manifest import load_manifest

    class Constant(torch.nn.Module):  # mask_features = image id in every pixel and channel
        def extract_features(self, images):
            return {"mask_features": torch.ones(images.shape[0], 3, 16, 16)
                    * torch.arange(images.shape[0]).view(-1, 1, 1, 1)}

    dataset = load_manifest(tmp_path / "data" / "val.yaml")
    features, labels = probe.pooled_mask_features(Constant(), dataset, 64, 96, batch_size=2)
    per_image = [sum(1 for a in dataset.coco["annotations"] if a["image_id"] == img.image_id)
                 for img in dataset.images]
    expected = torch.cat([torch.full((n, 3), float(i)) for i, n in enumerate(per_image)])
    torch.testing.assert_close(features, expected.double())
    assert labels.shape == (sum(per_image),)
