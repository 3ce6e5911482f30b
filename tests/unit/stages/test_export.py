"""`uplvp export`: the ONNX graph against PyTorch, the PyTorch graph module against predict's
post-processing, the docs example, and the CLI's error lines (docs/export.md)."""
from __future__ import annotations

import re
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.batching import collate
from pipeline.evaluation import postprocess_batch
from pipeline.transforms import Sample, resized_size
from stages.cli import app
from pipeline.evaluation import load_inference_model
from stages.export import EXTRA_MISSING, ExportConfig, reference_outputs, run_export
from uplvp_model.checkpoint import save_model_state
from uplvp_model.config import model_config
from uplvp_model.export import InstanceSegmenter
from uplvp_model.model import build_model
from tests.helpers import REPO

CATEGORY_IDS = [1, 4, 9]
# the graph resizes to short side 96 (long side <= 160): 96x128 stays, 160x112 -> 137x96
SHORT_SIDE, MAX_LONG_SIDE = 96, 160
SIZES = ((96, 128), (160, 112))
runner = CliRunner()

PRESETS = [
    pytest.param("tiny", {}, id="tiny"),
    pytest.param("tiny", {"decoder": "mask2former"}, id="tiny-mask2former"),
    pytest.param("small", {}, id="small"),
    pytest.param("lite", {}, id="lite"),
    pytest.param("base", {}, id="base", marks=pytest.mark.slow),
]


def save_finetuned(path: Path, preset: str, **overrides) -> Path:
    """A fine-tune checkpoint of ``preset`` (random weights, 3 classes, COCO ids 1, 4, 9) as
    ``stages.train_checkpoint`` writes one: model state, ``model_config``, ``category_ids``,
    ``step``. The last class head is sharpened so that scores spread out and some pass 0.5."""
    torch.manual_seed(0)
    cfg = model_config(preset, num_classes=len(CATEGORY_IDS), **overrides)
    model = build_model(cfg)
    head = model.decoder.class_heads()[-1]
    with torch.no_grad():
        head.weight.mul_(10.0)
        head.bias[-1] = -2.0  # "no object"
    save_model_state(path, model, {"model_config": cfg.to_dict(),
                                   "category_ids": CATEGORY_IDS, "step": 7})
    return path


def save_run(folder: Path, preset: str, **overrides) -> Path:
    """A fine-tuning run folder: ``checkpoints/step-0000007.pt`` named by ``latest``."""
    save_finetuned(folder / "checkpoints" / "step-0000007.pt", preset, **overrides)
    (folder / "checkpoints" / "latest").write_text("step-0000007.pt\n")
    return folder


def drawn_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3] RGB: a flat background with seeded random filled discs and boxes."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = rng.integers(0, 256, 3)
    for _ in range(5):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), int(rng.integers(6, 30)), colour, -1)
        else:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(8, 50)),
                                          y + int(rng.integers(8, 50))), colour, -1)
    return image


def as_input(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] -> the graph's [1, 3, H, W]."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None])


def segmenter_of(checkpoint: Path, max_detections: int = 20) -> InstanceSegmenter:
    loaded = load_inference_model(checkpoint, "cpu")
    return InstanceSegmenter(loaded.model, loaded.category_ids, short_side=SHORT_SIDE,
                             max_long_side=MAX_LONG_SIDE, max_detections=max_detections)


@pytest.mark.parametrize("preset, overrides", PRESETS)
def test_onnx_matches_pytorch_on_two_image_sizes(preset, overrides, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    run = save_run(tmp_path / "run", preset, **overrides)
    t0 = time.perf_counter()
    summary = run_export(ExportConfig(checkpoint=run, out=tmp_path / "model.onnx",
                                      short_side=SHORT_SIDE, max_long_side=MAX_LONG_SIDE,
                                      max_detections=20, verify=False))
    seconds = time.perf_counter() - t0
    assert summary["onnx"] == tmp_path / "model.onnx" and summary["num_detections"] == 20
    session = ort.InferenceSession(str(summary["onnx"]), providers=["CPUExecutionProvider"])
    segmenter = segmenter_of(run)
    for seed, (height, width) in enumerate(SIZES):
        image = as_input(drawn_image(height, width, seed))
        masks, scores, labels = session.run(None, {"image": image})
        ref_masks, ref_scores, ref_labels = reference_outputs(segmenter, image)
        assert masks.shape == ref_masks.shape == (20, height, width)
        assert scores.shape == labels.shape == (20,) and labels.dtype == np.int64
        mask_diff = float(np.abs(masks - ref_masks).max())
        score_diff = float(np.abs(scores - ref_scores).max())
        print(f"export {preset}{'-' + overrides['decoder'] if overrides else ''} "
              f"{height}x{width}: max |mask probability diff| {mask_diff:.2e}, max |score "
              f"diff| {score_diff:.2e} (export {seconds:.1f} s)")
        assert mask_diff <= 1e-3
        assert score_diff <= 1e-4
        np.testing.assert_array_equal(labels, ref_labels)
        assert set(labels.tolist()) <= set(CATEGORY_IDS)
        assert np.all(np.diff(scores) <= 1e-7)  # best first


@pytest.mark.parametrize("preset, overrides", [
    pytest.param("tiny", {}, id="tiny"),
    pytest.param("tiny", {"decoder": "mask2former"}, id="tiny-mask2former"),
    pytest.param("lite", {}, id="lite"),  # its TF-"SAME" convolutions are swapped for export
])
def test_graph_module_is_predicts_inference(preset, overrides, tmp_path):
    """Without resizing (the image is already at the short side), the PyTorch graph module
    gives predict's instances: the same scores, labels and binary masks as the original model
    through ``pipeline.batching.collate`` + ``pipeline.evaluation.postprocess.postprocess_batch``."""
    checkpoint = save_finetuned(tmp_path / "model.pt", preset, **overrides)
    loaded = load_inference_model(checkpoint, "cpu")
    image = drawn_image(100, 120, seed=3)  # padded to 128 x 128 by both
    segmenter = InstanceSegmenter(loaded.model, loaded.category_ids, short_side=100,
                                  max_long_side=200, max_detections=15)
    masks, scores, labels = reference_outputs(segmenter, as_input(image))

    batch = collate([Sample(1, image, np.zeros((0, 100, 120), bool), np.zeros(0, np.int64),
                            (100, 120))])
    with torch.inference_mode():
        outputs = loaded.model(batch["images"])
    (expected,) = postprocess_batch(outputs, tuple(batch["images"].shape[-2:]),
                                    batch["image_sizes"], batch["orig_sizes"], max_detections=15)
    kept = (scores > 0) & (masks > 0.5).reshape(15, -1).any(1)  # predict: threshold 0, no empty
    np.testing.assert_allclose(scores[kept], expected.scores.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(labels[kept],
                                  np.asarray(CATEGORY_IDS)[expected.labels.numpy()])
    # binary masks agree except where the probability is within float noise of the 0.5 cut
    # (the graph sums in another order: one pixel at 0.5 +- 1e-7 may fall either side)
    decided = np.abs(masks[kept] - 0.5) > 1e-5
    np.testing.assert_array_equal((masks[kept] > 0.5)[decided], expected.masks.numpy()[decided])
    assert decided.mean() > 0.999
    assert kept.sum() >= 1


def test_resize_follows_predict(tmp_path):
    """The graph's resized size is ``pipeline.transforms.resized_size``, and its float resize
    is within about a grey level of predict's OpenCV resize of the uint8 image."""
    checkpoint = save_finetuned(tmp_path / "model.pt", "tiny")
    loaded = load_inference_model(checkpoint, "cpu")
    for short, long_ in ((800, 1333), (96, 160), (37, 41)):
        segmenter = InstanceSegmenter(loaded.model, CATEGORY_IDS, short_side=short,
                                      max_long_side=long_)
        for height, width in ((480, 640), (640, 480), (1, 999), (333, 333), (101, 3), (96, 128),
                              (160, 112), (1080, 1920), (75, 100)):
            got = segmenter.resized_size(torch.tensor(height), torch.tensor(width))
            assert tuple(int(v) for v in got) == resized_size(height, width, short, long_)
    image = drawn_image(160, 112, seed=1)
    height, width = resized_size(160, 112, SHORT_SIDE, MAX_LONG_SIDE)
    ours = torch.nn.functional.interpolate(
        torch.from_numpy(as_input(image)).float(), size=(height, width), mode="bilinear",
        align_corners=False)[0].permute(1, 2, 0).numpy()
    theirs = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    assert np.abs(ours - theirs).max() <= 1.0


def test_metadata_and_torchscript(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    checkpoint = save_finetuned(tmp_path / "model.pt", "tiny")
    summary = run_export(ExportConfig(checkpoint=checkpoint, out=tmp_path / "out" / "m.onnx",
                                      short_side=SHORT_SIDE, max_long_side=MAX_LONG_SIDE,
                                      max_detections=500, opset=14, torchscript=True))
    # 10 kernels x 3 classes: all 30 candidates; the command's own check passed
    assert summary["num_detections"] == 30
    assert [c.ok for c in summary["comparisons"]] == [True, True]
    session = ort.InferenceSession(str(summary["onnx"]), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["uplvp.category_ids"] == "[1, 4, 9]" and meta["uplvp.max_detections"] == "30"
    assert meta["uplvp.step"] == "7" and meta["uplvp.short_side"] == str(SHORT_SIDE)
    assert [o.shape for o in session.get_outputs()] == [[30, "height", "width"], [30], [30]]
    assert summary["torchscript"] == tmp_path / "out" / "m.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        traced = torch.jit.load(str(summary["torchscript"]))
    segmenter = segmenter_of(checkpoint, max_detections=500)
    for seed, (height, width) in enumerate(SIZES):
        image = as_input(drawn_image(height, width, seed))
        with torch.inference_mode():
            got = [t.numpy() for t in traced(torch.from_numpy(image))]
        expected = reference_outputs(segmenter, image)
        assert got[0].shape == (30, height, width)
        assert np.abs(got[0] - expected[0]).max() <= 1e-5
        np.testing.assert_array_equal(got[2], expected[2])


def docs_example() -> str:
    text = (REPO / "docs" / "export.md").read_text()
    section = text.split("\n## Example\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_docs_example_runs_as_written(tmp_path, monkeypatch, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("PIL")
    from PIL import Image

    checkpoint = save_finetuned(tmp_path / "model.pt", "tiny", decoder="mask2former")
    run_export(ExportConfig(checkpoint=checkpoint, out=tmp_path / "model.onnx",
                            short_side=SHORT_SIDE, max_long_side=MAX_LONG_SIDE,
                            max_detections=20, verify=False))
    Image.fromarray(drawn_image(120, 90, seed=5)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(docs_example(), "docs/export.md", "exec"), {"__name__": "__main__"})
    lines = capsys.readouterr().out.splitlines()

    session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    image = np.asarray(Image.open("photo.jpg").convert("RGB"))
    masks, scores, labels = session.run(None, {"image": as_input(image)})
    keep = (scores > 0.5) & (masks > 0.5).any(axis=(1, 2))
    assert len(lines) == int(keep.sum()) >= 1
    for line, score, label in zip(lines, scores[keep], labels[keep]):
        assert line.startswith(f"category {label}: score {score:.2f}, ")


def test_cli_missing_checkpoint_is_one_error_line(tmp_path):
    pytest.importorskip("onnxruntime")
    result = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "nope.pt"),
                                 "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {tmp_path / 'nope.pt'}: checkpoint not found"]
    assert not (tmp_path / "m.onnx").exists()


def test_cli_bad_options_are_one_error_line(tmp_path):
    pytest.importorskip("onnxruntime")
    checkpoint = save_finetuned(tmp_path / "model.pt", "tiny")
    for args, message in ((["--out", str(tmp_path / "m.txt")], "--out must name a .onnx file"),
                          (["--out", str(tmp_path / "m.onnx"), "--opset", "11"],
                           "--opset must be in 14..20, got 11"),
                          (["--out", str(tmp_path / "m.onnx"), "--max-detections", "0"],
                           "--max-detections must be >= 1")):
        result = runner.invoke(app, ["export", "--checkpoint", str(checkpoint), *args])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_cli_without_the_export_extra_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    result = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "nope.pt"),
                                 "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {EXTRA_MISSING}"
    assert EXTRA_MISSING == "uplvp export needs the export extra: pip install 'uplvp[export]'"
