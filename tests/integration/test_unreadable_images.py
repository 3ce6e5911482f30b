"""One bad file never stops evaluate or predict: the good images are scored / predicted, the
bad ones listed with their reason, and the exit code says some failed."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from typer.testing import CliRunner

from pipeline.errors import InputError, UnreadableImage
from pipeline.evaluation import evaluate_predictions, without_images
from stages.cli import app
from stages.predict import PredictConfig, run_predict
from stages.evaluate import run_evaluate
from tests.helpers.evaluation import (STUB_PROBS, BrightRegionModel, eval_cfg, use_model,
                                   write_labeled_set)
from uplvp_model.checkpoint import read_checkpoint

CORRUPT = b"\xff\xd8\xff\xe0 this is not really a JPEG"
DECODE_ERROR = "not a decodable image (corrupt, truncated or unsupported format)"


def predict_cfg(tmp_path, **kw) -> PredictConfig:
    options = dict(checkpoint=tmp_path / "model.pt", images=tmp_path / "images",
                   out=tmp_path / "pred", short_side=32, max_long_side=64, score_threshold=0.4,
                   overlays=True)
    return PredictConfig(**{**options, **kw})


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_predict_skips_a_corrupt_image_and_keeps_every_good_one(tmp_path, monkeypatch,
                                                                batch_size):
    write_labeled_set(tmp_path)
    use_model(monkeypatch, BrightRegionModel(STUB_PROBS), [1, 2])
    good = run_predict(predict_cfg(tmp_path, batch_size=batch_size), progress=False)
    expected = [r for r in json.loads(good["predictions"].read_text()) if r["image_id"] != 2]
    (tmp_path / "images" / "2.png").write_bytes(CORRUPT)
    summary = run_predict(predict_cfg(tmp_path, batch_size=batch_size, out=tmp_path / "p2"),
                          progress=False)
    out = tmp_path / "p2"
    # the other images' predictions are exactly those of the run without the bad file
    assert json.loads((out / "predictions.json").read_text()) == expected
    assert [im["id"] for im in json.loads((out / "images.json").read_text())["images"]] == [
        1, 3, 4]
    assert json.loads((out / "unreadable.json").read_text()) == [
        {"image_id": 2, "file_name": "2.png", "error": DECODE_ERROR}]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["1.png", "3.png", "4.png"]
    assert summary["num_images"] == 3 and summary["num_unreadable"] == 1
    counts = json.loads((out / "stage.json").read_text())["counts"]
    assert counts["images"] == 3 and counts["images_unreadable"] == 1
    assert json.loads((tmp_path / "pred" / "unreadable.json").read_text()) == []


def test_predict_cli_lists_the_bad_file_and_exits_1(tmp_path, monkeypatch):
    write_labeled_set(tmp_path)
    use_model(monkeypatch, BrightRegionModel(STUB_PROBS), [1, 2])
    (tmp_path / "images" / "3.png").write_bytes(b"")
    result = CliRunner().invoke(app, [
        "predict", "--checkpoint", str(tmp_path / "model.pt"), "--images",
        str(tmp_path / "images"), "--out", str(tmp_path / "pred"), "--short-side", "32",
        "--no-progress"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "predict: 1 of 4 images could not be read, no predictions for them" in text
    assert "3.png: empty file (0 bytes)" in text
    assert "Traceback" not in result.output


def test_evaluate_scores_the_readable_images_and_lists_the_bad_one(tmp_path, monkeypatch):
    data = write_labeled_set(tmp_path)
    use_model(monkeypatch, BrightRegionModel(STUB_PROBS), [1, 2])
    (tmp_path / "images" / "4.png").write_bytes(CORRUPT)
    report = run_evaluate(eval_cfg(data, tmp_path), progress=False)
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert {r["image_id"] for r in predictions} == {1, 2, 3}
    # the scores are those of the ground truth without image 4, computed independently
    gt = without_images(data["coco"], [4])
    assert [im["id"] for im in gt["images"]] == [1, 2, 3]
    assert all(a["image_id"] != 4 for a in gt["annotations"])
    independent = evaluate_predictions(gt, predictions)
    assert report["segm"] == independent["segm"] and report["bbox"] == independent["bbox"]
    assert report["num_images"] == 3
    assert report["unreadable"] == [{"image_id": 4, "file_name": "4.png", "error": DECODE_ERROR}]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["unreadable"] == report["unreadable"]
    result = CliRunner().invoke(app, [
        "stage", "evaluate", "--checkpoint", str(tmp_path / "model.pt"), "--data",
        str(data["manifest"]), "--out", str(tmp_path / "eval2"), "--short-side", "32",
        "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "4.png: " + DECODE_ERROR in " ".join(result.output.split())


def test_no_readable_image_is_one_error(tmp_path, monkeypatch):
    data = write_labeled_set(tmp_path)
    use_model(monkeypatch, BrightRegionModel(STUB_PROBS), [1, 2])
    for image in (tmp_path / "images").glob("*.png"):
        image.write_bytes(CORRUPT)
    with pytest.raises(InputError, match="none of the 4 images could be read"):
        run_predict(predict_cfg(tmp_path), progress=False)
    with pytest.raises(InputError, match="none of the 4 images could be read"):
        run_evaluate(eval_cfg(data, tmp_path), progress=False)


def test_unreadable_image_survives_a_worker_process_boundary():
    err = UnreadableImage("empty file (0 bytes)", "/data/a.jpg", 7, "a.jpg")
    back = pickle.loads(pickle.dumps(err))
    assert back.record() == {"image_id": 7, "file_name": "a.jpg",
                             "error": "empty file (0 bytes)"}
    assert str(back) == str(err) == "/data/a.jpg: image cannot be read: empty file (0 bytes)"


def test_predict_with_loader_workers_skips_the_bad_image(tmp_path, monkeypatch):
    write_labeled_set(tmp_path)
    use_model(monkeypatch, BrightRegionModel(STUB_PROBS), [1, 2])
    (tmp_path / "images" / "1.png").write_bytes(CORRUPT)
    summary = run_predict(predict_cfg(tmp_path, num_workers=2), progress=False)
    assert summary["num_images"] == 3
    assert json.loads(summary["unreadable"].read_text())[0]["image_id"] == 1


class _NotATensor:
    pass


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes\n")
    with pytest.raises(ValueError) as err:
        read_checkpoint(text)
    assert str(err.value) == f"{text}: not a checkpoint (not a file written by torch.save)"
    torch.save({"model": {}, "format_version": 1, "extra": _NotATensor()}, tmp_path / "obj.pt")
    with pytest.raises(ValueError) as err:
        read_checkpoint(tmp_path / "obj.pt")
    message = str(err.value)
    assert message == (f"{tmp_path / 'obj.pt'}: not a readable checkpoint (it holds objects "
                       "other than tensors and plain values)")
    result = CliRunner().invoke(app, [
        "predict", "--checkpoint", str(text), "--images", str(tmp_path), "--out",
        str(tmp_path / "pred")])
    assert result.exit_code == 2
    assert "weights_only" not in result.output
    assert result.output.strip().count("\n") == 0, result.output
