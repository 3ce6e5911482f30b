"""experiments/finetune_probe.py: objectness scores, label accuracy on hand-made detections, and
the script end to end against `uplvp stage evaluate` on the same checkpoint."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.synth import write_synth_dataset
from stages.evaluate import EvaluateConfig, run_evaluate
from uplvp_model.checkpoint import save_model_state
from uplvp_model.config import model_config
from uplvp_model.model import build_model

import importlib


probe = importlib.import_module("experiments.finetune_probe")


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def box_mask(y0, y1, x0, x1, size=8) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_objectness_is_one_minus_the_no_object_probability():
    logits = torch.tensor([[[2.0, -1.0, 0.5, 1.0], [-3.0, 0.0, 0.0, 4.0]]])
    two = probe.objectness_outputs({"pred_logits": logits, "pred_masks": None})["pred_logits"]
    torch.testing.assert_close(two.softmax(-1)[..., 0], 1 - logits.softmax(-1)[..., -1])


def test_label_stats_takes_the_best_scored_covering_detection():
    left, right = box_mask(0, 4, 0, 4), box_mask(4, 8, 4, 8)
    coco_gt = {
        "images": [{"id": 1, "height": 8, "width": 8}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "area": 16.0, "iscrowd": 0,
             "segmentation": rle(left)},
            {"id": 2, "image_id": 1, "category_id": 7, "area": 16.0, "iscrowd": 0,
             "segmentation": rle(right)},
            {"id": 3, "image_id": 1, "category_id": 7, "area": 16.0, "iscrowd": 1,
             "segmentation": rle(box_mask(0, 4, 4, 8))},  # crowd: ignored
        ],
    }
    results = [
        {"image_id": 1, "category_id": 3, "score": 0.6, "segmentation": rle(left)},     # right
        {"image_id": 1, "category_id": 7, "score": 0.3, "segmentation": rle(left)},
        {"image_id": 1, "category_id": 3, "score": 0.4, "segmentation": rle(right)},    # wrong
        {"image_id": 1, "category_id": 7, "score": 0.2, "segmentation": rle(box_mask(4, 8, 4, 6))},
        # IoU 0.5 with `right`, category right, but a lower score than the wrong one above
        {"image_id": 1, "category_id": 7, "score": 0.9, "segmentation": rle(box_mask(6, 8, 6, 8))},
        # IoU 0.25: does not cover `right`, so its higher score does not count
    ]
    share, conf, covered = probe.label_stats(results, coco_gt)
    assert covered == 2
    assert share == pytest.approx(0.5)
    assert conf == pytest.approx((0.6 + 0.4) / 2)


def test_main_matches_uplvp_evaluate(tmp_path, capsys):
    write_synth_dataset(tmp_path / "data", seed=0, num_unlabeled=0, num_train=1, num_val=3,
                        image_size=64, progress=False)
    cfg = model_config("tiny", num_classes=8, hidden_dim=32, num_kernels=6, num_stages=1)
    torch.manual_seed(0)
    save_model_state(tmp_path / "f.pt", build_model(cfg),
                     {"model_config": cfg.to_dict(), "category_ids": list(range(1, 9))})
    val = tmp_path / "data" / "val.yaml"
    assert probe.main([str(tmp_path / "f.pt"), "--data", str(val), "--short-side", "64"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    report = run_evaluate(EvaluateConfig(checkpoint=tmp_path / "f.pt", data=val,
                                         out=tmp_path / "eval", short_side=64,
                                         max_long_side=96), progress=False)
    assert float(row[1]) == round(100 * report["segm"]["AP"], 1)
    assert float(row[2]) == round(100 * report["segm"]["AP50"], 1)
    found, best_iou = float(row[5]), float(row[6])
    assert 0.0 <= found <= 1.0 and 0.0 <= best_iou <= 1.0
