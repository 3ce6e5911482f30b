"""`uplvp predict`, `uplvp demo`, `uplvp export`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.cli.common import app
from stages.cli.config_help import config_command
from stages.cli.options import DEVICE, PROGRESS, Given, config_options
from stages.errors import user_errors


@app.command("predict", cls=config_command("stages.predict:PredictConfig"))
@user_errors
@config_options(DEVICE, PROGRESS)
def predict(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Fine-tuned checkpoint file or run folder (its latest)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images or a manifest."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (default 2)."),
    short_side: Optional[int] = typer.Option(None, help="Resize short side (default 800)."),
    score_threshold: Optional[float] = typer.Option(None, help="Keep detections from (default 0.5)."),
    overlays: Optional[bool] = typer.Option(None, "--overlays", help="Also write overlay PNGs."),
    *,
    given: Given,
) -> None:
    """Inference on new images: COCO results JSON and optional overlays (exit 1: some images
    could not be read; the others are predicted, the failed listed in OUT/unreadable.json)."""
    from stages.evaluate import EXIT_SOME_IMAGES_UNREADABLE
    from stages.predict import PredictConfig, run_predict

    if run_predict(given.load(PredictConfig), progress=given.progress)["num_unreadable"]:
        raise typer.Exit(EXIT_SOME_IMAGES_UNREADABLE)


# --------------------------------------------------------------------------- demo


@app.command("demo", cls=config_command("stages.demo:DemoConfig"))
@user_errors
@config_options(PROGRESS)
def demo(
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default demo_run)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default 0)."),
    pretrain_steps: Optional[int] = typer.Option(
        None, help="Pre-training steps (default 1000)."),
    finetune_steps: Optional[int] = typer.Option(
        None, help="Fine-tuning steps of each arm (default 200)."),
    propose_workers: Optional[int] = typer.Option(
        None, help="Ray actors for propose (default 2; 0: no Ray)."),
    proposer: Optional[str] = typer.Option(
        None, "--proposer", help="Pseudo masks: clip (the shipped toy CLIP) or classical "
        "(weight-free, no CLIP; text loss off)."),
    clip_model: Optional[str] = typer.Option(
        None, "--clip-model", help="CLIP of the clip proposer (default uplvp-synth-vit, shipped)."),
    clip_checkpoint: Optional[str] = typer.Option(
        None, "--clip-checkpoint", help="Its weights file (default: the shipped model's)."),
    *,
    given: Given,
) -> None:
    """The whole pipeline on embedded synthetic data: synth -> propose -> pretrain -> finetune
    from the pre-trained kernels and from scratch (same budget) -> evaluate -> comparison."""
    from stages.demo import DemoConfig, run_demo

    run_demo(given.load(DemoConfig), progress=given.progress)


@app.command("export", cls=config_command("stages.export:ExportConfig"))
@user_errors
@config_options()
def export(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Fine-tuned checkpoint file or run folder (its latest)."),
    out: Optional[Path] = typer.Option(None, "--out", help="ONNX file to write (.onnx)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset, 14..20 (default 17)."),
    max_detections: Optional[int] = typer.Option(
        None, "--max-detections", help="Detections the graph returns (default 100)."),
    short_side: Optional[int] = typer.Option(
        None, help="Resize short side inside the graph (default 800)."),
    max_long_side: Optional[int] = typer.Option(
        None, help="Resize long side cap inside the graph (default 1333)."),
    torchscript: Optional[bool] = typer.Option(
        None, "--torchscript", help="Also write a TorchScript module (OUT .torchscript.pt)."),
    verify: Optional[bool] = typer.Option(
        None, "--verify/--no-verify", help="Check the graph against PyTorch (default on)."),
    *,
    given: Given,
) -> None:
    """Export a fine-tuned checkpoint to ONNX: uint8 image [1, 3, H, W] in (any size), mask
    probabilities, scores and category ids out (needs the export extra; docs/export.md)."""
    from stages.export import ExportConfig, run_export

    run_export(given.load(ExportConfig))