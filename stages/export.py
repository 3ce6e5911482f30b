"""`uplvp export`: a fine-tuned checkpoint -> one ONNX file: an image in, instances out.

checkpoint (a file, or a run folder: its ``checkpoints/latest``, as ``uplvp predict`` takes)
-> ``uplvp_model.export.InstanceSegmenter`` (predict's resize, normalisation, padding, model
and post-processing, one image at a time) -> ``torch.onnx.export`` with the TorchScript-based
exporter (``dynamo=False``; image height and width dynamic) -> metadata
(:data:`METADATA_KEYS`) -> onnxruntime run against
PyTorch on a probe image of another size than the traced one -> ``--out`` (written atomically);
with ``torchscript`` also a traced TorchScript module next to it (``OUT`` with the suffix
``.torchscript.pt``).

The graph (``docs/export.md``): input ``image`` uint8 [1, 3, H, W] RGB; outputs ``masks``
float32 [K, H, W] (mask probabilities at the input size), ``scores`` float32 [K] (descending),
``labels`` int64 [K] (COCO category ids), K = min(max_detections, kernels x classes).
Needs the ``export`` extra (onnx, onnxruntime): without it the command fails with one line.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from pipeline.atomic import atomic_path
from pipeline.errors import InputError
from stages.config import StageConfig
from pipeline.evaluation import load_inference_model
from uplvp_model.export import INPUT_NAME, OUTPUT_NAMES, InstanceSegmenter

console = Console(stderr=True)

EXTRA_MISSING = "uplvp export needs the export extra: pip install 'uplvp[export]'"
MIN_OPSET, MAX_OPSET = 14, 20  # attention exports from 14 on; the exporter stops at 20
TORCHSCRIPT_SUFFIX = ".torchscript.pt"
# trace and check sizes: any size traces the same graph (the resize to short_side is in it);
# the check uses another size and aspect than the trace
TRACE_SIZE = (96, 128)
CHECK_SIZE = (150, 100)
# onnxruntime vs PyTorch: differences above these are reported as a warning (float rounding
# gives ~1e-6; K-Net's binary grouping masks can turn a last-bit difference into more)
MASK_TOLERANCE = 1e-3
SCORE_TOLERANCE = 1e-4
METADATA_KEYS = ("uplvp.category_ids", "uplvp.short_side", "uplvp.max_long_side",
                 "uplvp.max_detections", "uplvp.checkpoint", "uplvp.step", "uplvp.model_config")


class ExportConfig(StageConfig):
    checkpoint: Path  # a checkpoint file, or a run folder (its checkpoints/latest is used)
    out: Path  # the .onnx file to write
    opset: int = 17
    max_detections: int = 100
    short_side: int = 800  # predict's resize, done inside the graph
    max_long_side: int = 1333
    torchscript: bool = False  # also write OUT with the suffix .torchscript.pt
    verify: bool = True  # run onnxruntime against PyTorch on a probe image after exporting

    HASH_EXCLUDE = frozenset({"out", "verify"})


@dataclass(frozen=True)
class Comparison:
    """Exported graph vs PyTorch on one image: max |difference| of the mask probabilities and
    of the scores, and whether the labels are equal."""

    size: tuple[int, int]
    mask_diff: float
    score_diff: float
    labels_equal: bool

    @property
    def ok(self) -> bool:
        return (self.labels_equal and self.mask_diff <= MASK_TOLERANCE
                and self.score_diff <= SCORE_TOLERANCE)

    def line(self) -> str:
        return (f"{self.size[0]}x{self.size[1]} image: max |mask probability diff| "
                f"{self.mask_diff:.2e}, max |score diff| {self.score_diff:.2e}, labels "
                f"{'equal' if self.labels_equal else 'DIFFER'}")


def require_export_extra() -> None:
    """:class:`InputError` (:data:`EXTRA_MISSING`) unless onnx and onnxruntime import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise InputError(EXTRA_MISSING) from None


def run_export(cfg: ExportConfig) -> dict:
    """Run the command; returns ``{"onnx": path, "torchscript": path or None, "checkpoint":
    path, "num_detections": K, "comparisons": [Comparison, ...] (empty without verify),
    "seconds": float}``."""
    require_export_extra()
    for name in ("max_detections", "short_side", "max_long_side"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    if not MIN_OPSET <= cfg.opset <= MAX_OPSET:
        raise InputError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {cfg.opset}")
    out = Path(cfg.out)
    if out.suffix.lower() != ".onnx":
        raise InputError("--out must name a .onnx file", out)
    t0 = time.perf_counter()
    loaded = load_inference_model(cfg.checkpoint, "cpu")
    segmenter = InstanceSegmenter(loaded.model, loaded.category_ids, short_side=cfg.short_side,
                                  max_long_side=cfg.max_long_side,
                                  max_detections=cfg.max_detections)
    console.print(f"export: checkpoint {loaded.checkpoint} (step {loaded.step}), "
                  f"{len(loaded.category_ids)} classes, {segmenter.num_detections} detections, "
                  f"opset {cfg.opset}")
    metadata = {
        "uplvp.category_ids": json.dumps(loaded.category_ids),
        "uplvp.short_side": str(cfg.short_side), "uplvp.max_long_side": str(cfg.max_long_side),
        "uplvp.max_detections": str(segmenter.num_detections),
        "uplvp.checkpoint": str(loaded.checkpoint.resolve()), "uplvp.step": str(loaded.step),
        "uplvp.model_config": json.dumps(loaded.model.cfg.to_dict()),
    }
    with atomic_path(out) as staged:
        export_onnx(segmenter, staged, cfg.opset, metadata)
        comparisons = []
        if cfg.verify:
            comparisons.append(compare_onnx(segmenter, staged, CHECK_SIZE))
            _report("onnxruntime", comparisons[-1])
    torchscript = None
    if cfg.torchscript:
        torchscript = out.with_suffix(TORCHSCRIPT_SUFFIX)
        export_torchscript(segmenter, torchscript)
        if cfg.verify:
            comparisons.append(compare_torchscript(segmenter, torchscript, CHECK_SIZE))
            _report("TorchScript", comparisons[-1])
    seconds = round(time.perf_counter() - t0, 2)
    console.print(f"export: {out}" + (f" and {torchscript}" if torchscript else "")
                  + f" in {seconds} s (input '{INPUT_NAME}' uint8 [1, 3, H, W] RGB; outputs "
                  + ", ".join(OUTPUT_NAMES) + "; docs/export.md)")
    return {"onnx": out, "torchscript": torchscript, "checkpoint": loaded.checkpoint,
            "num_detections": segmenter.num_detections, "comparisons": comparisons,
            "seconds": seconds}


def export_onnx(segmenter: InstanceSegmenter, path: Path, opset: int,
                metadata: dict[str, str] | None = None) -> None:
    """Trace ``segmenter`` on a :data:`TRACE_SIZE` probe image and write the ONNX graph to
    ``path`` (dynamic height and width) with ``metadata`` as the model's metadata
    properties."""
    import onnx

    segmenter.eval()  # the exporter restores the mode it finds, on every submodule
    example = torch.from_numpy(probe_image(*TRACE_SIZE))
    with warnings.catch_warnings():
        # shape checks inside torch and the model become constants of the trace (harmless),
        # and the TorchScript-based exporter is deprecated (still the predictable one)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            segmenter, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {2: "height", 3: "width"},
                          "masks": {1: "height", 2: "width"}})
    model = onnx.load(str(path))
    for output in model.graph.output:  # K is fixed: say so instead of an inferred name
        first = output.type.tensor_type.shape.dim[0]
        first.Clear()
        first.dim_value = segmenter.num_detections
    model.doc_string = (
        "uplvp instance segmentation: image uint8 [1, 3, H, W] RGB -> masks float32 [K, H, W] "
        "(probabilities), scores float32 [K] (descending), labels int64 [K] (COCO category "
        "ids); keep scores > 0.5 and non-empty masks > 0.5 as uplvp predict does")
    onnx.helper.set_model_props(model, dict(metadata or {}))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_torchscript(segmenter: InstanceSegmenter, path: Path) -> None:
    """``torch.jit.trace`` of ``segmenter`` on a :data:`TRACE_SIZE` probe image, saved to
    ``path`` atomically (dynamic sizes: the trace records the shape arithmetic)."""
    segmenter.eval()
    example = torch.from_numpy(probe_image(*TRACE_SIZE))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(segmenter, (example,), check_trace=False)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))


def compare_onnx(segmenter: InstanceSegmenter, path: Path, size: tuple[int, int]
                 ) -> Comparison:
    """Run the ONNX file at ``path`` (onnxruntime, CPU) and ``segmenter`` on the same
    ``size`` probe image."""
    import onnxruntime

    image = probe_image(*size)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: image})
    return _compare(size, reference_outputs(segmenter, image), got)


def compare_torchscript(segmenter: InstanceSegmenter, path: Path, size: tuple[int, int]
                        ) -> Comparison:
    """Run the TorchScript file at ``path`` and ``segmenter`` on the same ``size`` test
    image."""
    image = probe_image(*size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        traced = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        got = [t.numpy() for t in traced(torch.from_numpy(image))]
    return _compare(size, reference_outputs(segmenter, image), got)


def reference_outputs(segmenter: InstanceSegmenter, image: np.ndarray) -> list[np.ndarray]:
    """``segmenter`` (PyTorch, eager) on a uint8 [1, 3, H, W] array: masks, scores, labels."""
    with torch.inference_mode():
        return [t.numpy() for t in segmenter(torch.from_numpy(image))]


def _compare(size: tuple[int, int], expected: list[np.ndarray], got: list[np.ndarray]
             ) -> Comparison:
    for name, a, b in zip(OUTPUT_NAMES, expected, got):
        if a.shape != b.shape:
            raise RuntimeError(f"exported graph: output {name} has shape {list(b.shape)}, "
                               f"PyTorch gives {list(a.shape)}")
    return Comparison(size, float(np.abs(got[0] - expected[0]).max(initial=0.0)),
                      float(np.abs(got[1] - expected[1]).max(initial=0.0)),
                      bool(np.array_equal(got[2], expected[2])))


def _report(runtime: str, comparison: Comparison) -> None:
    if comparison.ok:
        console.print(f"export: {runtime} matches PyTorch on a {comparison.line()}")
    else:
        console.print(f"[yellow]export: warning: {runtime} differs from PyTorch on a "
                      f"{comparison.line()} (tolerance {MASK_TOLERANCE:g} / "
                      f"{SCORE_TOLERANCE:g})[/yellow]")


def probe_image(height: int, width: int) -> np.ndarray:
    """A deterministic uint8 [1, 3, height, width] RGB image: a smooth background with two
    flat shapes (flat regions: resize implementations agree on them to the last bit or so)."""
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    cols = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    image = np.empty((3, height, width), dtype=np.float32)
    image[0] = 60 + 120 * rows
    image[1] = 90 + 100 * cols
    image[2] = 140 - 60 * rows * cols
    y, x = np.mgrid[0:height, 0:width]
    disc = (y - 0.55 * height) ** 2 + (x - 0.35 * width) ** 2 <= (0.22 * min(height, width)) ** 2
    image[:, disc] = np.array([220.0, 40.0, 40.0])[:, None]
    box = (slice(height // 8, height // 2), slice(width // 2, width - width // 8))
    image[:, box[0], box[1]] = np.array([30.0, 60.0, 200.0])[:, None, None]
    return np.ascontiguousarray(image.round().astype(np.uint8)[None])
