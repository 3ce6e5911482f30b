"""Inference on CPU as a deployer compares it: one image in, final instances out.

    .venv/bin/python -m benchmarks.inference_cpu --out benchmarks/results/inference_cpu.txt
    .venv/bin/python -m benchmarks.inference_cpu --threads 1 \
        --out benchmarks/results/inference_cpu_1thread.txt
    .venv/bin/python -m benchmarks.inference_cpu --quick --threads 1     # tiny models, 64 px

About 20 minutes for the full run on a 2-core machine (half of it the memory processes), ~30 s
for ``--quick``.

Models (random weights, 80 classes, nothing downloaded), each end to end from a uint8 RGB
image [H, W, 3] to its final instances (binary masks [K, H, W] at the image's size, scores,
labels), with the pre- and post-processing a user runs:

- ``ours (PyTorch)``: ``uplvp_model.export.InstanceSegmenter`` (resize, normalisation, padding,
  model, scores, top-k, masks at image size) around ``build_model(model_config(preset))``, as
  ``uplvp export`` builds it, under ``torch.inference_mode``; then ``masks > 0.5``;
- ``ours (ONNX)``: the same segmenter exported by ``stages.export.export_onnx`` (what ``uplvp
  export`` writes) run by onnxruntime (CPU provider, ``intra_op_num_threads`` = ``--threads``,
  ``inter_op_num_threads`` 1, its default graph optimisation: all); then ``masks > 0.5``;
- ``HF Mask2Former``: transformers' ``Mask2FormerForUniversalSegmentation`` from its default
  config (100 queries, 6 deformable encoder layers, 10 decoder layers) on a transformers
  ResNet (``experiments/peer_models.py``), with its ``Mask2FormerImageProcessor``
  (shortest edge ``--size``, pads to 32) and ``post_process_instance_segmentation``
  (``threshold=0``, ``target_sizes`` = the image's, ``return_binary_maps=True``);
- ``Mask R-CNN``: torchvision's ``MaskRCNN`` on ``resnet_fpn_backbone(weights=None)`` (what
  ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` builds, at either depth), its
  own transform (``min_size = max_size = --size``) and post-processing (boxes, pasted masks);
  the uint8 image is converted to a float [3, H, W] tensor in [0, 1] first; then
  ``masks > 0.5``.

Random weights change only data-dependent work, so every model is made to return its full
number of detections: ours K = 100 (``max_detections=100``; it applies no threshold),
Mask R-CNN ``box_score_thresh=0.0``, ``box_detections_per_img=100``, HF ``threshold=0`` over its
100 queries (it still drops masks with no pixel set). Otherwise speed does not depend on
weight values. The table prints the detections each model returned.

Method: every model is built first (our ONNX files exported to a temporary folder), then run
``--warmup`` times (round robin), then timed for ``--rounds`` rounds, each round running every
model once in turn, so that load from other processes hits all models alike. Printed per
model: median seconds per image, images/s (1 / median), the ratio of its images/s to HF
Mask2Former's at the same backbone, the detections it returned. Peak memory: each model
again in its own fresh process (``--memory-runs`` runs after one warm-up), reporting the
process's peak resident set (``VmHWM``: Python, libraries, weights, activations; not
``ru_maxrss``, which a child started by ``fork`` + ``exec`` inherits from its parent) and that
minus the process's resident set just before the model was built (after the imports: weights
and activations). The ONNX process imports only numpy and onnxruntime (what a deployer runs);
the others import torch. Our PyTorch and ONNX rows are checked on the test image to produce the
same instances (labels, scores, mask probabilities). The header names the CPU, the library
versions, the threads, the load average before and after the timed rounds and the CPU that
other processes used during them (``/proc/stat`` busy time minus this process's CPU time).

With more threads than free cores (e.g. 2 threads beside a job that keeps one of 2 cores busy)
PyTorch's OpenMP regions wait for the descheduled thread at every operator: eager PyTorch
models then run several times slower than with 1 thread, onnxruntime far less so; compare
rows of one run only, and state the load (the header does).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

NUM_CLASSES = 80
MAX_DETECTIONS = 100
TARGET_RATIO = 1.5  # the target: ours >= 1.5x HF Mask2Former's images/s
LONG_SIDE_FACTOR = 1333 / 800  # predict's max long side per short side
BACKBONE_NAMES = {"tiny": "tiny CNN", "resnet18": "ResNet-18", "resnet50": "ResNet-50"}
# the quick mode's transformers Mask2Former (tests/unit/scripts/test_peers.py's small config)
QUICK_HF_CONFIG = {"num_queries": 10, "encoder_layers": 1, "decoder_layers": 2,
                   "hidden_dim": 32, "mask_feature_size": 32, "feature_size": 32,
                   "dim_feedforward": 64, "num_attention_heads": 4}

# a runner maps a uint8 [H, W, 3] image to (binary masks [K, H, W], scores [K], labels [K])
Instances = tuple[Any, Any, Any]
Runner = Callable[[np.ndarray], Instances]


@dataclass(frozen=True)
class Spec:
    """One benchmarked model. ``kind``: ``ours_torch``, ``ours_onnx``, ``hf_mask2former`` or
    ``maskrcnn``; ``backbone``: ``tiny``, ``resnet18`` or ``resnet50``; ``preset``,
    ``decoder`` and ``overrides``: our ``model_config`` (ours only); ``small``: the quick
    mode's small transformers config."""

    kind: str
    backbone: str
    preset: str = ""
    decoder: str = "knet"
    overrides: tuple[tuple[str, Any], ...] = ()
    small: bool = False

    @property
    def ours(self) -> bool:
        return self.kind.startswith("ours")

    @property
    def label(self) -> str:
        if self.ours:
            runtime = "PyTorch" if self.kind == "ours_torch" else "ONNX"
            return f"ours {self.preset} {self.decoder} ({runtime})"
        return {"hf_mask2former": "HF Mask2Former", "maskrcnn": "Mask R-CNN"}[self.kind] + (
            " (small config)" if self.small else "")

    @property
    def key(self) -> str:
        """A file-name-safe identifier (ONNX file names, JSON)."""
        extra = "-".join(f"{k}={v}" for k, v in self.overrides)
        return "_".join(p for p in (self.kind, self.backbone, self.preset, self.decoder
                                    if self.ours else "", extra) if p)

    @property
    def onnx_file(self) -> str:
        """The ONNX file of our model (shared by its PyTorch and ONNX rows)."""
        return Spec("ours_onnx", self.backbone, self.preset, self.decoder, self.overrides).key \
            + ".onnx"


def full_specs() -> list[Spec]:
    """The full benchmark: ours tiny / small (R18) / base (R50) K-Net and base Mask2Former, each
    in PyTorch and ONNX; HF Mask2Former and Mask R-CNN on R18 and R50."""
    specs = []
    for preset, backbone, decoder in (("tiny", "tiny", "knet"), ("small", "resnet18", "knet"),
                                      ("base", "resnet50", "knet"),
                                      ("base", "resnet50", "mask2former")):
        for kind in ("ours_torch", "ours_onnx"):
            specs.append(Spec(kind, backbone, preset, decoder))
    for backbone in ("resnet18", "resnet50"):
        specs += [Spec("hf_mask2former", backbone), Spec("maskrcnn", backbone)]
    return specs


def quick_specs() -> list[Spec]:
    """The quick mode (tests): our tiny preset on ResNet-18, a small HF Mask2Former on
    ResNet-18, Mask R-CNN R18."""
    overrides = (("backbone", "resnet18"),)
    return [Spec("ours_torch", "resnet18", "tiny", "knet", overrides),
            Spec("ours_onnx", "resnet18", "tiny", "knet", overrides),
            Spec("hf_mask2former", "resnet18", small=True), Spec("maskrcnn", "resnet18")]


def scene(size: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 [size, size, 3] RGB scene: a smooth background and seeded flat
    discs and boxes (numpy only: the ONNX memory process imports no torch)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[..., 0] = 60 + 120 * ramp[:, None]
    image[..., 1] = 90 + 100 * ramp[None, :]
    image[..., 2] = 140 - 60 * ramp[:, None] * ramp[None, :]
    y, x = np.mgrid[0:size, 0:size]
    for _ in range(8):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        cy, cx = rng.uniform(0, size, 2)
        extent = rng.uniform(0.05, 0.2) * size
        if rng.random() < 0.5:
            inside = (y - cy) ** 2 + (x - cx) ** 2 <= extent ** 2
        else:
            inside = (np.abs(y - cy) <= extent) & (np.abs(x - cx) <= 0.7 * extent)
        image[inside] = colour
    return np.ascontiguousarray(image.round().astype(np.uint8))


# --------------------------------------------------------------------------------------------
# building the models


def our_segmenter(spec: Spec, size: int):
    """Our model of ``spec`` (seed 0, random weights) inside an ``InstanceSegmenter`` resizing
    to short side ``size`` (long side at most predict's 1333/800 of it), K = 100."""
    import torch

    from uplvp_model.config import model_config
    from uplvp_model.export import InstanceSegmenter
    from uplvp_model.model import build_model

    torch.manual_seed(0)
    cfg = model_config(spec.preset, decoder=spec.decoder, num_classes=NUM_CLASSES,
                       **dict(spec.overrides))
    return InstanceSegmenter(build_model(cfg).eval(), list(range(1, NUM_CLASSES + 1)),
                             short_side=size, max_long_side=round(size * LONG_SIDE_FACTOR),
                             max_detections=MAX_DETECTIONS)


def export_ours(spec: Spec, size: int, folder: Path) -> Path:
    """Export our model of ``spec`` as ``uplvp export`` does (``stages.export.export_onnx``,
    opset 17) to ``folder``; returns the file."""
    from stages.export import export_onnx

    path = folder / spec.onnx_file
    export_onnx(our_segmenter(spec, size), path, opset=17)
    return path


def onnx_session(path: Path, threads: int):
    """onnxruntime CPU session: ``threads`` intra-op threads, 1 inter-op thread, defaults
    otherwise (graph optimisation level: all)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build_runner(spec: Spec, size: int, threads: int, onnx_folder: Path
                 ) -> tuple[Runner, int | None, Any]:
    """``(runner, parameter count, the module or onnxruntime session it runs)`` of ``spec``;
    ours in ONNX reads ``onnx_folder / spec.onnx_file`` (exported before) and counts no
    parameters (the exporter folds BatchNorm into convolutions and drops the heads that the
    final outputs do not use: its row takes the PyTorch model's count)."""
    if spec.kind == "ours_onnx":
        session = onnx_session(onnx_folder / spec.onnx_file, threads)
        return onnx_runner(session), None, session
    import torch

    torch.set_num_threads(threads)
    if spec.kind == "ours_torch":
        module = our_segmenter(spec, size)
        runner = ours_torch_runner(module)
    elif spec.kind == "hf_mask2former":
        module, runner = hf_mask2former(spec, size)
    elif spec.kind == "maskrcnn":
        module = maskrcnn(spec.backbone, size)
        runner = maskrcnn_runner(module)
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}")
    return runner, sum(p.numel() for p in module.parameters()), module


def ours_torch_runner(segmenter) -> Runner:
    """Our ``InstanceSegmenter`` on the image as [1, 3, H, W] uint8 (a view), binary masks."""
    import torch

    def run(image: np.ndarray) -> Instances:
        with torch.inference_mode():
            masks, scores, labels = segmenter(torch.from_numpy(image).permute(2, 0, 1)[None])
            return masks > 0.5, scores, labels

    return run


def onnx_runner(session) -> Runner:
    """Our exported graph in onnxruntime on the image as [1, 3, H, W] uint8, binary masks
    (the docs/export.md example)."""

    def run(image: np.ndarray) -> Instances:
        masks, scores, labels = session.run(
            None, {"image": np.ascontiguousarray(image.transpose(2, 0, 1)[None])})
        return masks > 0.5, scores, labels

    return run


def hf_mask2former(spec: Spec, size: int) -> tuple[Any, Runner]:
    """transformers' Mask2Former (seed 0), its image processor at short side ``size`` and its
    instance post-processing at threshold 0."""
    import torch
    from experiments.peer_models import build_hf_mask2former
    from transformers import Mask2FormerImageProcessor

    torch.manual_seed(0)
    model = build_hf_mask2former(NUM_CLASSES, spec.backbone,
                                 **(QUICK_HF_CONFIG if spec.small else {})).eval()
    processor = Mask2FormerImageProcessor(
        size={"shortest_edge": size, "longest_edge": round(size * LONG_SIDE_FACTOR)})

    def run(image: np.ndarray) -> Instances:
        with torch.inference_mode():
            inputs = processor(images=image, return_tensors="pt")
            outputs = model(pixel_values=inputs["pixel_values"],
                            pixel_mask=inputs["pixel_mask"])
            (result,) = processor.post_process_instance_segmentation(
                outputs, threshold=0.0, target_sizes=[image.shape[:2]],
                return_binary_maps=True)
        info = result["segments_info"]
        masks = result["segmentation"]
        if masks is None or not info:  # no instance: an empty result
            masks = torch.zeros((0, *image.shape[:2]), dtype=torch.bool)
        return (masks > 0, torch.tensor([s["score"] for s in info]),
                torch.tensor([s["label_id"] for s in info], dtype=torch.int64))

    return model, run


def maskrcnn(backbone: str, size: int):
    """torchvision Mask R-CNN (seed 0) on ``backbone`` (weights=None, trained BatchNorm as
    ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` builds it), 80 classes +
    background, its transform at ``min_size = max_size = size``, every detection kept."""
    import torch
    from torch import nn
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    body = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=nn.BatchNorm2d,
                               trainable_layers=5)
    return MaskRCNN(body, num_classes=NUM_CLASSES + 1, min_size=size, max_size=size,
                    box_score_thresh=0.0, box_detections_per_img=MAX_DETECTIONS).eval()


def maskrcnn_runner(model) -> Runner:
    """Mask R-CNN on the image as float [3, H, W] in [0, 1]; its pasted masks > 0.5."""
    import torch

    def run(image: np.ndarray) -> Instances:
        with torch.inference_mode():
            tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
            (det,) = model([tensor])
            return det["masks"][:, 0] > 0.5, det["scores"], det["labels"]

    return run


# --------------------------------------------------------------------------------------------
# measuring


def to_numpy(instances: Instances) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks, scores and labels as numpy arrays (torch CPU tensors without a copy)."""
    return tuple(np.asarray(a) for a in instances)  # type: ignore[return-value]


def time_round_robin(runners: list[Runner], image: np.ndarray, warmup: int, rounds: int
                     ) -> tuple[list[list[float]], list[int]]:
    """``warmup`` untimed then ``rounds`` timed calls of every runner, one after the other
    within each round; returns the seconds per runner and the detections each returned."""
    for _ in range(warmup):
        for run in runners:
            run(image)
    seconds: list[list[float]] = [[] for _ in runners]
    detections = [0] * len(runners)
    for _ in range(rounds):
        for i, run in enumerate(runners):
            start = time.perf_counter()
            instances = run(image)
            seconds[i].append(time.perf_counter() - start)
            detections[i] = len(instances[1])
    return seconds, detections


def compare_ours(torch_run: Runner, onnx_run: Runner, image: np.ndarray, segmenter, session
                 ) -> dict:
    """Our PyTorch and ONNX rows on ``image``: labels equal, max |score diff|, max |mask
    probability diff| and the share of binary-mask pixels that differ."""
    import torch

    with torch.inference_mode():
        ref = [t.numpy() for t in segmenter(torch.from_numpy(image).permute(2, 0, 1)[None])]
    got = session.run(None, {"image": np.ascontiguousarray(image.transpose(2, 0, 1)[None])})
    a, b = to_numpy(torch_run(image)), to_numpy(onnx_run(image))
    return {"labels_equal": bool(np.array_equal(a[2], b[2])),
            "score_diff": float(np.abs(a[1] - b[1]).max(initial=0.0)),
            "mask_prob_diff": float(np.abs(ref[0] - got[0]).max(initial=0.0)),
            "mask_pixels_differ": float((a[0] != b[0]).mean()) if a[0].size else 0.0}


def status_mb(field: str) -> float:
    """A memory field of ``/proc/self/status`` in MB: ``VmRSS`` (resident now) or ``VmHWM``
    (peak resident set of this process image: unlike ``ru_maxrss``, which Linux carries over
    ``fork`` + ``exec`` from the parent, it starts afresh in a new program)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure_memory(spec: Spec, size: int, threads: int, onnx_folder: Path, runs: int) -> dict:
    """In this (fresh) process: RSS before building, then build, one warm-up and ``runs``
    runs; returns ``{"before_mb", "peak_mb"}`` (peak: ``VmHWM``)."""
    image = scene(size)
    if spec.kind != "ours_onnx":
        import torch  # noqa: F401  (imported before the baseline, as in the other processes)
        import torchvision  # noqa: F401
        if spec.kind == "hf_mask2former":
            import transformers  # noqa: F401
        else:
            import uplvp_model.export  # noqa: F401
    else:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    before = status_mb("VmRSS")
    run, _, _ = build_runner(spec, size, threads, onnx_folder)
    for _ in range(1 + runs):
        run(image)
    return {"before_mb": before, "peak_mb": status_mb("VmHWM")}


def memory_in_subprocess(spec: Spec, args: argparse.Namespace, onnx_folder: Path) -> dict:
    """:func:`measure_memory` in a fresh Python process running this script."""
    child = {"spec": asdict(spec), "size": args.size, "threads": args.threads,
             "onnx_folder": str(onnx_folder), "runs": args.memory_runs}
    done = subprocess.run([sys.executable, "-m", "benchmarks.inference_cpu", "--child",
                           json.dumps(child)], capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"memory process of {spec.label} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spec_of(values: dict) -> Spec:
    values = dict(values)
    values["overrides"] = tuple(tuple(pair) for pair in values["overrides"])
    return Spec(**values)


# --------------------------------------------------------------------------------------------
# the report


@dataclass(frozen=True)
class CpuSample:
    """Busy CPU seconds of the whole machine (``/proc/stat``), CPU seconds of this process and
    wall time, at one moment: two samples give the CPU other processes used in between."""

    machine_busy_s: float
    own_s: float
    wall_s: float

    @classmethod
    def now(cls) -> CpuSample:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal, no guest
        times = os.times()
        return cls(busy, times.user + times.system, time.perf_counter())


def others_cores(start: CpuSample, end: CpuSample) -> float:
    """Cores' worth of CPU that other processes used between two samples."""
    wall = max(end.wall_s - start.wall_s, 1e-9)
    return max((end.machine_busy_s - start.machine_busy_s) - (end.own_s - start.own_s),
               0.0) / wall


def machine_line(threads: int, load_before: tuple[float, float, float],
                 load_after: tuple[float, float, float], others: float) -> str:
    """The header: CPU, library versions, threads; the load average before and after the
    timed rounds and the CPU other processes used during them (``others``, in cores)."""
    import onnxruntime
    import torch
    import torchvision
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    models = ([line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
               if line.startswith("model name")] if cpuinfo.is_file() else [])
    chip = models[0] if models else (platform.processor() or platform.machine())
    shared = others >= 0.1 or max(load_before[0], load_after[0]) >= 0.5
    return (f"# machine: {chip}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, torchvision {torchvision.__version__}, "
            f"onnxruntime {onnxruntime.__version__}; {threads} thread(s) per model "
            f"(torch.set_num_threads({threads}); onnxruntime intra-op {threads}, inter-op 1)\n"
            f"# load average (1/5/15 min) before the timed rounds {load_before[0]:.2f} / "
            f"{load_before[1]:.2f} / {load_before[2]:.2f}, after {load_after[0]:.2f} / "
            f"{load_after[1]:.2f} / {load_after[2]:.2f}; other processes used "
            f"{others:.2f} of the {os.cpu_count()} CPUs on average during them: "
            + ("the CPU was SHARED with other jobs" if shared else "no other load on the CPU"))


def ratio_to_hf(rows: list[dict]) -> None:
    """Set each row's ``ratio``: its images/s over HF Mask2Former's at the same backbone
    (None without such a row)."""
    hf = {r["backbone"]: r["images_per_s"] for r in rows if r["kind"] == "hf_mask2former"}
    for r in rows:
        r["ratio"] = r["images_per_s"] / hf[r["backbone"]] if r["backbone"] in hf else None


def table(rows: list[dict]) -> str:
    lines = ["| model | backbone | params (M) | s/image (median) | images/s | vs HF Mask2Former "
             "| detections | peak RSS MB | + over imports MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
        grown = (f"{r['peak_mb'] - r['before_mb']:.0f}" if r.get("peak_mb") is not None
                 else "-")
        lines.append(f"| {r['label']} | {BACKBONE_NAMES[r['backbone']]} | "
                     f"{r['params'] / 1e6:.1f} | {r['median_s']:.4f} | "
                     f"{r['images_per_s']:.2f} | {ratio} | {r['detections']} | {peak} | "
                     f"{grown} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """Per backbone with an HF row: our faster runtime against HF and the fastest model."""
    lines = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        group = [r for r in rows if r["backbone"] == backbone]
        hf = [r for r in group if r["kind"] == "hf_mask2former"]
        ours = [r for r in group if r["kind"].startswith("ours")]
        if not hf or not ours:
            continue
        fastest = max(group, key=lambda r: r["images_per_s"])
        for decoder in dict.fromkeys(r["decoder"] for r in ours):
            best = max((r for r in ours if r["decoder"] == decoder),
                       key=lambda r: r["images_per_s"])
            met = best["ratio"] >= TARGET_RATIO
            lines.append(f"{BACKBONE_NAMES[backbone]}: {best['label']} "
                         f"{best['images_per_s']:.2f} images/s = {best['ratio']:.2f}x HF "
                         f"Mask2Former's {hf[0]['images_per_s']:.2f} (target >= "
                         f"{TARGET_RATIO}x: {'met' if met else 'NOT met'})")
        lines.append(f"{BACKBONE_NAMES[backbone]}: fastest is {fastest['label']} "
                     f"({fastest['images_per_s']:.2f} images/s)")
    return lines


def settings_lines(args: argparse.Namespace) -> list[str]:
    return [
        f"# inference_cpu.py{' --quick' if args.quick else ''}: one {args.size} x {args.size} "
        f"uint8 RGB image (synthetic scene), batch 1, end to end (pre-processing, model, "
        f"post-processing to binary masks at image size, scores, labels); {args.warmup} "
        f"warm-up runs, then {args.rounds} timed rounds, each running every model once in "
        f"turn; s/image = median over the rounds",
        f"# random weights, {NUM_CLASSES} classes; every model returns its full number of "
        f"detections: ours max_detections={MAX_DETECTIONS} (no threshold), Mask R-CNN "
        f"box_score_thresh=0.0 and detections_per_img={MAX_DETECTIONS}, HF threshold=0 over "
        f"its queries (it drops empty masks); apart from that data-dependent work, speed does "
        f"not depend on weight values",
        f"# peak RSS: VmHWM (peak resident set) of a fresh process per model after 1 warm-up + "
        f"{args.memory_runs} runs (libraries included: the ONNX process imports numpy and "
        f"onnxruntime only, the others torch); + over imports: that minus the process's RSS "
        f"just before building the model (weights + activations + allocator)",
    ]


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=None,
                   help="square image side in pixels (default 512; --quick: 64)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per model")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs of every model first (default 3; --quick: 1)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10; "
                   "--quick: 3)")
    p.add_argument("--memory-runs", type=int, default=3,
                   help="runs after one warm-up in each memory process")
    p.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    p.add_argument("--quick", action="store_true",
                   help="tiny models (ours tiny on ResNet-18, a small HF Mask2Former, Mask "
                        "R-CNN R18) at 64 px, 1 warm-up, 3 rounds: for tests")
    p.add_argument("--out", type=Path, help="also write the printed report here")
    p.add_argument("--json", type=Path, help="write every measured time and row here")
    p.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)  # a memory process
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 64 if args.quick else 512
    if args.rounds is None:
        args.rounds = 3 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        c = args.child
        result = measure_memory(spec_of(c["spec"]), c["size"], c["threads"],
                                Path(c["onnx_folder"]), c["runs"])
        print(json.dumps(result))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    specs = quick_specs() if args.quick else full_specs()
    image = scene(args.size)
    with tempfile.TemporaryDirectory(prefix="inference_cpu_") as tmp:
        folder = Path(tmp)
        for spec in specs:
            if spec.kind == "ours_onnx":
                t0 = time.perf_counter()
                export_ours(spec, args.size, folder)
                print(f"inference_cpu: exported {spec.label} in {time.perf_counter() - t0:.1f}"
                      " s", file=sys.stderr, flush=True)
        built = [build_runner(spec, args.size, args.threads, folder) for spec in specs]
        runners = [runner for runner, _, _ in built]
        checks, params = {}, [count for _, count, _ in built]
        for i, spec in enumerate(specs):
            if spec.kind == "ours_onnx":
                twin = specs.index(Spec("ours_torch", spec.backbone, spec.preset, spec.decoder,
                                        spec.overrides))
                params[i] = params[twin]
                checks[spec.key] = compare_ours(runners[twin], runners[i], image,
                                                built[twin][2], built[i][2])
        load_before, sample = os.getloadavg(), CpuSample.now()
        print(f"inference_cpu: {len(specs)} models built; timing ({args.warmup} warm-up, "
              f"{args.rounds} rounds)", file=sys.stderr, flush=True)
        seconds, detections = time_round_robin(runners, image, args.warmup, args.rounds)
        load_after, others = os.getloadavg(), others_cores(sample, CpuSample.now())
        rows = []
        for spec, count_params, times, count in zip(specs, params, seconds, detections):
            median = statistics.median(times)
            rows.append({"label": spec.label, "kind": spec.kind, "backbone": spec.backbone,
                         "decoder": spec.decoder if spec.ours else "", "key": spec.key,
                         "params": count_params, "seconds": times, "median_s": median,
                         "images_per_s": 1.0 / median, "detections": count})
        ratio_to_hf(rows)
        del runners, built
        if not args.no_memory:
            for spec, row in zip(specs, rows):
                print(f"inference_cpu: memory of {spec.label}", file=sys.stderr, flush=True)
                row.update(memory_in_subprocess(spec, args, folder))
    lines = [*settings_lines(args), machine_line(args.threads, load_before, load_after, others),
             table(rows), *verdict(rows)]
    for key, check in checks.items():
        label = next(r["label"] for r in rows if r["key"] == key)
        lines.append(f"check {label} vs PyTorch on the test image: labels "
                     f"{'equal' if check['labels_equal'] else 'DIFFER'}, max |score diff| "
                     f"{check['score_diff']:.1e}, max |mask probability diff| "
                     f"{check['mask_prob_diff']:.1e}, binary mask pixels differing "
                     f"{100 * check['mask_pixels_differ']:.4f} %")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "checks": checks,
                                         "load_before": load_before, "load_after": load_after,
                                         "others_cores": others,
                                         "settings": vars(args) | {"out": str(args.out),
                                                                   "json": str(args.json)}},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
