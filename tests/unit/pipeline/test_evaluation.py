"""COCO metrics (pipeline.evaluation), the evaluate/predict stages and the run plot."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.coco import load_coco, mask_to_rle
from pipeline.errors import InputError
from pipeline.evaluation import (
    SUMMARY_KEYS,
    evaluate_model,
    evaluate_predictions,
    flat_metrics,
    model_config_of,
)
from stages.evaluate import EvaluateConfig, run_evaluate
from tests.helpers.evaluation import (
    BRIGHT,
    DARK,
    RECTS,
    square_mask,
    write_labeled_set,
    BrightRegionModel,
    use_model,
    STUB_PROBS,
    eval_cfg,
)
from stages.inspect_run import curves, plot_run, read_metrics
from stages.predict import PredictConfig, images_dataset, overlay_name, run_predict
from uplvp_model.checkpoint import save_model_state
from uplvp_model.config import model_config
from uplvp_model.model import build_model


def gt_from_masks(masks: dict[int, list[tuple[int, np.ndarray]]], size=(40, 40)) -> dict:
    """COCO dict: image id -> [(category_id, mask)]; RLE segmentations, no area/bbox/iscrowd
    (the evaluation fills them in)."""
    images, anns = [], []
    for image_id, objs in masks.items():
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": size[0],
                       "width": size[1]})
        for cat, mask in objs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "segmentation": mask_to_rle(mask)})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "square"}, {"id": 5, "name": "bar"}]}


def result(image_id: int, cat: int, mask: np.ndarray, score: float) -> dict:
    rle = mask_to_rle(mask)
    box = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
    return {"image_id": image_id, "category_id": cat, "segmentation": rle,
            "bbox": [float(v) for v in box], "score": score}


def test_predictions_equal_to_ground_truth_give_ap_one():
    a = square_mask(40, 40, 2, 2, 12, 12)
    b = square_mask(40, 40, 20, 5, 24, 35)
    c = square_mask(40, 40, 10, 10, 30, 30)
    coco = gt_from_masks({1: [(1, a), (5, b)], 2: [(1, c)]})
    results = [result(1, 1, a, 0.9), result(1, 5, b, 0.8), result(2, 1, c, 0.7)]
    metrics = evaluate_predictions(coco, results)
    for iou_type in ("segm", "bbox"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["APs"] == pytest.approx(1.0)  # all areas < 32^2
        assert metrics[iou_type]["APm"] is None and metrics[iou_type]["APl"] is None
        assert [(r["category_id"], r["name"], r["num_gt"], r["AP"])
                for r in metrics["per_category"][iou_type]] == [
            (1, "square", 2, pytest.approx(1.0)), (5, "bar", 1, pytest.approx(1.0))]
    assert metrics["num_images"] == 2 and metrics["num_predictions"] == 3
    json.dumps(metrics)  # plain values only


def test_partial_overlap_exact_ap():
    # GT 10x10 = 100 px; prediction 9x8 = 72 px inside it -> mask and box IoU 0.72: a match at
    # IoU thresholds 0.50 .. 0.70 (5 of 10) -> AP 0.5, AP50 1, AP75 0.
    gt = square_mask(40, 40, 0, 0, 10, 10)
    pred = square_mask(40, 40, 0, 0, 9, 8)
    metrics = evaluate_predictions(gt_from_masks({1: [(1, gt)]}), [result(1, 1, pred, 0.9)])
    for iou_type in ("segm", "bbox"):
        m = metrics[iou_type]
        assert (m["AP"], m["AP50"], m["AP75"]) == pytest.approx((0.5, 1.0, 0.0))
    assert metrics["per_category"]["segm"][0]["AP"] == pytest.approx(0.5)
    assert metrics["per_category"]["segm"][1]["AP"] is None  # category 5 has no ground truth


def test_false_positive_ranked_first_halves_precision():
    # two GT squares; a wrong detection scored above the one right one: recall reaches 0.5 at
    # precision 1/2 -> precision 0.5 at the 51 recall points 0.00..0.50 -> AP = 0.5 * 51 / 101
    a = square_mask(40, 40, 0, 0, 10, 10)
    b = square_mask(40, 40, 20, 20, 30, 30)
    wrong = square_mask(40, 40, 0, 25, 10, 35)
    coco = gt_from_masks({1: [(1, a)], 2: [(1, b)]})
    metrics = evaluate_predictions(coco, [result(1, 1, wrong, 0.9), result(2, 1, b, 0.5)])
    assert metrics["segm"]["AP"] == pytest.approx(0.5 * 51 / 101)


def test_zero_predictions_give_zero_ap_without_crash():
    coco = gt_from_masks({1: [(1, square_mask(40, 40, 0, 0, 10, 10))]})
    metrics = evaluate_predictions(coco, [])
    for iou_type in ("segm", "bbox"):
        assert metrics[iou_type]["AP"] == 0.0 and metrics[iou_type]["AP50"] == 0.0
    assert metrics["per_category"]["segm"][0]["AP"] == 0.0
    assert metrics["num_predictions"] == 0


def test_segm_area_comes_from_the_mask_not_the_box():
    # A false positive ranked first: a thin diagonal, mask area 40 px (small) but box 40x40 =
    # 1600 px (medium). Scored with its mask area it counts against APs (precision 1/2 -> 0.5);
    # scored with the box area pycocotools would ignore it for APs (-> 1.0).
    diagonal = np.zeros((40, 40), dtype=bool)
    diagonal[np.arange(40), np.arange(40)] = True
    gt = square_mask(40, 40, 0, 30, 5, 35)
    metrics = evaluate_predictions(gt_from_masks({1: [(1, gt)]}),
                                   [result(1, 1, diagonal, 0.9), result(1, 1, gt, 0.5)],
                                   iou_types=("segm",))
    assert metrics["segm"]["AP"] == pytest.approx(0.5)
    assert metrics["segm"]["APs"] == pytest.approx(0.5)
    assert "bbox" not in metrics


def test_bad_results_raise_one_clear_error():
    coco = gt_from_masks({1: [(1, square_mask(40, 40, 0, 0, 10, 10))]})
    good = result(1, 1, square_mask(40, 40, 0, 0, 10, 10), 1.0)
    with pytest.raises(InputError, match=r"results\[0\].image_id 3 is not a ground-truth image"):
        evaluate_predictions(coco, [{**good, "image_id": 3}])
    with pytest.raises(InputError, match="category_id 2 is not a ground-truth category"):
        evaluate_predictions(coco, [{**good, "category_id": 2}])
    small = result(1, 1, square_mask(20, 20, 0, 0, 5, 5), 1.0)
    with pytest.raises(InputError, match=r"RLE of size \[40, 40\]"):
        evaluate_predictions(coco, [small])
    with pytest.raises(ValueError, match="unknown iou type"):
        evaluate_predictions(coco, [good], iou_types=("keypoints",))


def test_flat_metrics_names():
    coco = gt_from_masks({1: [(1, square_mask(40, 40, 0, 0, 10, 10))]})
    flat = flat_metrics(evaluate_predictions(coco, []), prefix="val/")
    assert sorted(flat) == sorted(f"val/{t}_{k}" for t in ("segm", "bbox") for k in SUMMARY_KEYS)
    assert flat["val/segm_AP"] == 0.0


# --------------------------------------------------------------------------- stages


def test_run_evaluate_metrics_equal_pycocotools_rescoring(tmp_path, monkeypatch):
    data = write_labeled_set(tmp_path)
    use_model(monkeypatch, BrightRegionModel(STUB_PROBS), [1, 2])
    report = run_evaluate(eval_cfg(data, tmp_path), progress=False)
    out = tmp_path / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["step"] == 5 and saved["dataset"]["name"] == "bright"
    assert saved["dataset"]["manifest"] == str(data["manifest"].resolve())
    # each image: the bright region as class 0 (0.6) and as class 1 (0.3); half are wrong
    assert saved["num_predictions"] == len(predictions) == 8
    assert 0.2 < saved["segm"]["AP"] < 0.9

    rescored = evaluate_predictions(load_coco(data["annotations"]), predictions)
    for key in ("segm", "bbox", "per_category"):
        assert rescored[key] == saved[key]
    # pycocotools reads predictions.json as is and agrees (AP over all areas)
    gt = COCO(str(data["annotations"]))
    for iou_type in ("segm", "bbox"):
        evaluator = COCOeval(gt, gt.loadRes(str(out / "predictions.json")), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[:3].tolist() == pytest.approx(
            [saved[iou_type][k] for k in ("AP", "AP50", "AP75")])
    assert json.loads((out / "stage.json").read_text())["stage"] == "evaluate"


def test_run_evaluate_maps_category_ids_back(tmp_path, monkeypatch):
    data = write_labeled_set(tmp_path, category_ids=(3, 8))
    use_model(monkeypatch, BrightRegionModel(STUB_PROBS), [3, 8])
    run_evaluate(eval_cfg(data, tmp_path), progress=False)
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for res in predictions:
        by_image.setdefault(res["image_id"], []).append(res)
    assert sorted(by_image) == [1, 2, 3, 4]
    for results in by_image.values():  # class 0 (p 0.6) -> id 3 first, class 1 (0.3) -> id 8
        assert [r["category_id"] for r in results] == [3, 8]
        assert results[0]["segmentation"]["size"] == [24, 32]


def test_run_evaluate_with_zero_predictions(tmp_path, monkeypatch):
    data = write_labeled_set(tmp_path)
    use_model(monkeypatch, BrightRegionModel(STUB_PROBS), [1, 2])
    report = run_evaluate(eval_cfg(data, tmp_path, score_threshold=0.99), progress=False)
    assert json.loads((tmp_path / "eval" / "predictions.json").read_text()) == []
    assert report["num_predictions"] == 0
    assert report["segm"]["AP"] == 0.0 and report["bbox"]["AP"] == 0.0


def test_run_evaluate_rejects_other_categories(tmp_path, monkeypatch):
    data = write_labeled_set(tmp_path)
    use_model(monkeypatch, BrightRegionModel(STUB_PROBS), [1, 5])
    with pytest.raises(InputError, match=r"only in the checkpoint \[5\], only in the dataset "
                                         r"\[2\]"):
        run_evaluate(eval_cfg(data, tmp_path), progress=False)


def test_evaluate_model_restores_training_mode(tmp_path):
    data = write_labeled_set(tmp_path)
    model = BrightRegionModel(STUB_PROBS).train()
    batch_images = torch.full((1, 3, 32, 32), -2.0)
    batch = {"images": batch_images, "image_ids": [1], "image_sizes": [(24, 32)],
             "orig_sizes": [(24, 32)]}
    metrics, results = evaluate_model(model, [batch], data["coco"], [1, 2], device="cpu")
    assert model.training and results == [] and metrics["segm"]["AP"] == 0.0


def save_tiny_checkpoint(path, **extra) -> None:
    torch.manual_seed(0)
    cfg = model_config("tiny", num_classes=2)
    save_model_state(path, build_model(cfg), {"model_config": cfg.to_dict(), **extra})


def test_real_checkpoint_from_run_folder(tmp_path):
    data = write_labeled_set(tmp_path)
    run = tmp_path / "run"
    save_tiny_checkpoint(run / "checkpoints" / "step-0000003.pt", category_ids=[1, 2], step=3)
    (run / "checkpoints" / "latest").write_text("step-0000003.pt\n")
    cfg = EvaluateConfig(checkpoint=run, data=data["manifest"], out=tmp_path / "eval",
                         short_side=32, max_long_side=64, max_detections=5)
    report = run_evaluate(cfg, progress=False)
    assert report["checkpoint"] == str((run / "checkpoints" / "step-0000003.pt").resolve())
    assert report["step"] == 3
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert len(predictions) == report["num_predictions"] <= 4 * 5
    assert {r["category_id"] for r in predictions} <= {1, 2}


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    data = write_labeled_set(tmp_path)
    save_tiny_checkpoint(tmp_path / "no_ids.pt", step=1)
    save_tiny_checkpoint(tmp_path / "three_ids.pt", category_ids=[1, 2, 3])
    for name, message in (("no_ids.pt", "no 'category_ids'"),
                          ("three_ids.pt", "3 ids but the model predicts 2"),
                          ("missing.pt", "checkpoint not found")):
        cfg = EvaluateConfig(checkpoint=tmp_path / name, data=data["manifest"],
                             out=tmp_path / "eval", short_side=32)
        with pytest.raises(InputError, match=message):
            run_evaluate(cfg, progress=False)
    (tmp_path / "empty_run").mkdir()
    cfg = EvaluateConfig(checkpoint=tmp_path / "empty_run", data=data["manifest"],
                         out=tmp_path / "eval")
    with pytest.raises(InputError, match="no checkpoints/latest"):
        run_evaluate(cfg, progress=False)


def test_model_config_from_either_checkpoint_key():
    cfg = model_config("tiny", num_classes=3, backbone_checkpoint="/nowhere/r50.pth")
    for payload in ({"model_config": cfg.to_dict()}, {"config": {"model": cfg.to_dict()}}):
        loaded = model_config_of(payload, Path("x.pt"))
        assert loaded.num_classes == 3 and loaded.backbone_checkpoint is None
    with pytest.raises(InputError, match="no model config"):
        model_config_of({"config": {}}, Path("x.pt"))
    with pytest.raises(InputError, match="unknown ModelConfig field"):
        model_config_of({"model_config": {"widht": 3}}, Path("x.pt"))


def test_run_predict_folder_with_overlays(tmp_path, monkeypatch):
    write_labeled_set(tmp_path)
    (tmp_path / "images" / "sub").mkdir()
    (tmp_path / "images" / "4.png").rename(tmp_path / "images" / "sub" / "4.png")
    use_model(monkeypatch, BrightRegionModel(STUB_PROBS), [1, 2])
    cfg = PredictConfig(checkpoint=tmp_path / "model.pt", images=tmp_path / "images",
                        out=tmp_path / "pred", short_side=32, max_long_side=64,
                        score_threshold=0.4, overlays=True)
    summary = run_predict(cfg, progress=False)
    predictions = json.loads(summary["predictions"].read_text())
    images = json.loads(summary["images"].read_text())["images"]
    assert [(im["id"], im["file_name"], im["height"], im["width"]) for im in images] == [
        (1, "1.png", 24, 32), (2, "2.png", 24, 32), (3, "3.png", 24, 32),
        (4, "sub/4.png", 24, 32)]
    assert [(r["image_id"], r["category_id"]) for r in predictions] == [
        (1, 1), (2, 1), (3, 1), (4, 1)]  # score 0.6 kept, 0.3 below the threshold
    assert summary["num_predictions"] == 4
    assert overlay_name("sub/4.png") == "sub__4.png"
    for name, (y0, x0, y1, x1) in zip(["1.png", "2.png", "3.png", "sub__4.png"], RECTS):
        overlay = cv2.imread(str(tmp_path / "pred" / "overlays" / name))
        assert overlay.shape == (24, 32, 3)
        inside = overlay[(y0 + y1) // 2, (x0 + x1) // 2]
        assert not np.array_equal(inside, [BRIGHT] * 3)  # tinted by the mask colour
        assert np.array_equal(overlay[23 if y0 else 0, 31 if x0 < 20 else 0], [DARK] * 3)


def test_images_dataset_from_manifest_or_folder(tmp_path):
    data = write_labeled_set(tmp_path)
    from_manifest = images_dataset(data["manifest"])
    from_folder = images_dataset(tmp_path / "images")
    assert [r.file_name for r in from_manifest.images] == ["1.png", "2.png", "3.png", "4.png"]
    assert [(r.image_id, r.file_name) for r in from_folder.images] == [
        (1, "1.png"), (2, "2.png"), (3, "3.png"), (4, "4.png")]
    with pytest.raises(InputError, match="give a folder of images or a manifest"):
        images_dataset(tmp_path / "ann.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        images_dataset(tmp_path / "empty")


# --------------------------------------------------------------------------- inspect run

TRAIN_LINES = [
    {"kind": "train", "step": 10, "epoch": 0, "lr": 1e-4, "loss": 3.0, "loss_mask": 1.0,
     "loss_mask_aux0": 1.5, "grad_norm": 2.0},
    {"kind": "train", "step": 20, "epoch": 0, "lr": 1e-4, "loss": 2.0, "loss_mask": 0.8,
     "loss_mask_aux0": 1.0, "grad_norm": 1.0},
    {"kind": "eval", "step": 20, "val/segm_AP": 0.125, "val/segm_AP50": 0.25,
     "val/segm_APs": 0.1, "val/segm_APl": None},
]


def write_metrics(run, lines, tail: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)


def test_curves_select_losses_and_aps():
    losses, aps = curves(TRAIN_LINES)
    assert losses == {"loss": ([10, 20], [3.0, 2.0]), "loss_mask": ([10, 20], [1.0, 0.8])}
    assert aps == {"val/segm_AP": ([20], [0.125]), "val/segm_AP50": ([20], [0.25])}


def test_plot_run_writes_png(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, TRAIN_LINES, tail='{"kind": "train", "st')  # torn last line
    assert len(read_metrics(run / "metrics.jsonl")) == 3
    path = plot_run(run)
    assert path == run / "curves.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    image = cv2.imread(str(path))
    assert image.shape == (420, 1100, 3)
    other = plot_run(run, tmp_path / "plots" / "c.png")
    assert other.is_file()


def test_plot_run_bad_input(tmp_path):
    with pytest.raises(InputError, match="metrics file not found"):
        plot_run(tmp_path)
    write_metrics(tmp_path / "a", [TRAIN_LINES[0]], tail="not json\n" + json.dumps(
        TRAIN_LINES[1]) + "\n")
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        plot_run(tmp_path / "a")
    write_metrics(tmp_path / "b", [{"loss": 1.0}])
    with pytest.raises(InputError, match="line 1 has no numeric 'step'"):
        plot_run(tmp_path / "b")
    write_metrics(tmp_path / "c", [{"step": 1, "lr": 0.1}])
    with pytest.raises(InputError, match="no loss or AP values"):
        plot_run(tmp_path / "c")


def test_class_agnostic_segm_ignores_categories_and_merges_a_mask_given_twice():
    from pipeline.evaluation import class_agnostic_segm

    size = 20
    a = np.zeros((size, size), np.uint8)
    a[2:10, 2:10] = 1
    b = np.zeros((size, size), np.uint8)
    b[12:18, 12:18] = 1

    def rle(mask):
        encoded = mask_utils.encode(np.asfortranarray(mask))
        return {"size": [size, size], "counts": encoded["counts"].decode()}

    coco = {"images": [{"id": 1, "height": size, "width": size, "file_name": "x.png"}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle(a), "iscrowd": 0,
                 "area": 64.0, "bbox": [2, 2, 8, 8]},
                {"id": 2, "image_id": 1, "category_id": 2, "segmentation": rle(b), "iscrowd": 0,
                 "area": 36.0, "bbox": [12, 12, 6, 6]}]}
    # both masks exact, but under the wrong categories, and mask a twice (two classes)
    results = [{"image_id": 1, "category_id": 2, "segmentation": rle(a), "score": 0.9},
               {"image_id": 1, "category_id": 1, "segmentation": rle(a), "score": 0.5},
               {"image_id": 1, "category_id": 1, "segmentation": rle(b), "score": 0.8}]
    agnostic = class_agnostic_segm(coco, results)
    assert agnostic["AP"] == pytest.approx(1.0)  # both found, no duplicate counted as a miss
    category = evaluate_predictions(coco, results, iou_types=("segm",))["segm"]["AP"]
    # category-aware: cat finds a at 0.5 below the false b at 0.8 (precision 1/2 at its only
    # recall point: AP 0.5); dog's only detection is a false one (AP 0); mean 0.25
    assert category == pytest.approx(0.25)
