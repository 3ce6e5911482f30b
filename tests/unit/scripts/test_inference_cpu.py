"""benchmarks/inference_cpu.py: the quick mode prints a row per model, our PyTorch and ONNX rows
give the same instances, the printed numbers are the measured ones, a memory process reports."""
from __future__ import annotations

import json
import re
import statistics

import pytest
import torch

import importlib

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
inference_cpu = importlib.import_module("benchmarks.inference_cpu")

ROW = re.compile(r"^\| (?P<label>[^|]+) \| (?P<backbone>[^|]+) \| (?P<params>[\d.]+) \| "
                 r"(?P<median>[\d.]+) \| (?P<ips>[\d.]+) \| (?P<ratio>[\d.]+x|-) \| "
                 r"(?P<detections>\d+) \| (?P<peak>\d+|-) \| (?P<grown>-?\d+|-) \|$")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run (1 thread, no memory processes): (printed text, JSON record)."""
    folder = tmp_path_factory.mktemp("inference_cpu")
    threads = torch.get_num_threads()
    try:
        assert inference_cpu.main(["--quick", "--threads", "1", "--no-memory",
                                   "--out", str(folder / "report.txt"),
                                   "--json", str(folder / "times.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    return (folder / "report.txt").read_text(), json.loads((folder / "times.json").read_text())


def test_quick_mode_prints_a_row_per_model_with_the_measured_numbers(quick_run):
    text, record = quick_run
    rows = {m["label"].strip(): m for m in map(ROW.match, text.splitlines()) if m}
    labels = [spec.label for spec in inference_cpu.quick_specs()]
    assert list(rows) == labels == [r["label"] for r in record["rows"]]
    hf = next(r for r in record["rows"] if r["kind"] == "hf_mask2former")
    for r in record["rows"]:
        printed = rows[r["label"]]
        assert len(r["seconds"]) == 3 and min(r["seconds"]) > 0
        median = statistics.median(r["seconds"])
        assert float(printed["median"]) == pytest.approx(median, abs=5e-5)
        assert float(printed["ips"]) == pytest.approx(1 / median, abs=5e-3)
        ratio = hf["median_s"] / median  # images/s over HF's images/s
        assert float(printed["ratio"].rstrip("x")) == pytest.approx(ratio, abs=5e-3)
        assert printed["peak"] == printed["grown"] == "-"  # --no-memory
    # full detections: ours K = 100, Mask R-CNN 100, HF at most its 10 queries
    assert [int(rows[label]["detections"]) for label in labels[:2]] == [100, 100]
    assert int(rows["Mask R-CNN"]["detections"]) == 100
    assert 1 <= int(rows["HF Mask2Former (small config)"]["detections"]) <= 10
    assert rows["HF Mask2Former (small config)"]["ratio"] == "1.00x"


def test_ours_in_pytorch_and_onnx_give_the_same_instances(quick_run):
    text, record = quick_run
    (check,) = record["checks"].values()
    assert check["labels_equal"]
    assert check["score_diff"] <= 1e-4 and check["mask_prob_diff"] <= 1e-3
    assert check["mask_pixels_differ"] <= 1e-3
    assert "check ours tiny knet (ONNX) vs PyTorch on the test image: labels equal" in text
    torch_row, onnx_row = record["rows"][:2]
    assert torch_row["params"] == onnx_row["params"] > 0  # the ONNX row counts the model's


def test_header_names_machine_threads_and_load(quick_run):
    text, _ = quick_run
    machine = next(line for line in text.splitlines() if line.startswith("# machine: "))
    assert f"torch {torch.__version__}" in machine and "onnxruntime " in machine
    assert "1 thread(s) per model" in machine
    assert re.search(r"# load average \(1/5/15 min\) before the timed rounds [\d.]+ / ", text)
    assert re.search(r"other processes used [\d.]+ of the \d+ CPUs on average", text)
    assert "full number of detections" in text


def test_cpu_of_other_processes_is_the_machine_s_busy_time_minus_ours():
    start = inference_cpu.CpuSample(machine_busy_s=100.0, own_s=10.0, wall_s=0.0)
    end = inference_cpu.CpuSample(machine_busy_s=130.0, own_s=30.0, wall_s=10.0)
    assert inference_cpu.others_cores(start, end) == pytest.approx(1.0)  # 30 busy, 20 ours
    now = inference_cpu.CpuSample.now()
    assert now.machine_busy_s > 0 and now.own_s > 0


def test_ratios_and_the_verdict_follow_the_images_per_second():
    rows = [{"label": "ours a (ONNX)", "kind": "ours_onnx", "backbone": "resnet18",
             "decoder": "knet", "images_per_s": 3.0},
            {"label": "ours a (PyTorch)", "kind": "ours_torch", "backbone": "resnet18",
             "decoder": "knet", "images_per_s": 2.0},
            {"label": "HF", "kind": "hf_mask2former", "backbone": "resnet18",
             "images_per_s": 2.5},
            {"label": "ours b (ONNX)", "kind": "ours_onnx", "backbone": "resnet50",
             "decoder": "knet", "images_per_s": 1.0},
            {"label": "HF50", "kind": "hf_mask2former", "backbone": "resnet50",
             "images_per_s": 0.8},
            {"label": "MR50", "kind": "maskrcnn", "backbone": "resnet50", "images_per_s": 1.2},
            {"label": "ours t", "kind": "ours_torch", "backbone": "tiny", "decoder": "knet",
             "images_per_s": 9.0}]
    inference_cpu.ratio_to_hf(rows)
    assert [r["ratio"] for r in rows][:6] == pytest.approx([1.2, 0.8, 1.0, 1.25, 1.0, 1.5])
    assert rows[6]["ratio"] is None  # no HF model on the tiny CNN
    lines = inference_cpu.verdict(rows)
    assert lines == [
        "ResNet-18: ours a (ONNX) 3.00 images/s = 1.20x HF Mask2Former's 2.50 "
        "(target >= 1.5x: NOT met)",
        "ResNet-18: fastest is ours a (ONNX) (3.00 images/s)",
        "ResNet-50: ours b (ONNX) 1.00 images/s = 1.25x HF Mask2Former's 0.80 "
        "(target >= 1.5x: NOT met)",
        "ResNet-50: fastest is MR50 (1.20 images/s)"]


def test_a_memory_process_reports_its_peak_over_its_baseline(tmp_path):
    """The ONNX model's memory process (numpy + onnxruntime only) on an exported tiny model."""
    spec = inference_cpu.quick_specs()[1]
    inference_cpu.export_ours(spec, 64, tmp_path)
    args = inference_cpu.parse_args(["--quick", "--threads", "1"])
    result = inference_cpu.memory_in_subprocess(spec, args, tmp_path)
    assert 0 < result["before_mb"] < result["peak_mb"] < 2000
