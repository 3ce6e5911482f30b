"""`uplvp stage propose|backbone|pretrain|finetune|evaluate`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.cli.common import stage_app
from stages.cli.config_help import config_command
from stages.cli.options import DEVICE, MODEL_TRAINING, PROGRESS, RUN, Given, config_options
from stages.errors import user_errors

# --------------------------------------------------------------------------- stages


@stage_app.command("propose", cls=config_command("stages.propose:ProposeConfig"))
@user_errors
@config_options(PROGRESS)
def stage_propose(
    images: Optional[Path] = typer.Option(None, "--images", help="Manifest of the unlabeled images."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (masks/, images/, stage.json)."),
    proposer: Optional[str] = typer.Option(
        None, "--proposer", help="classical (default, weight-free) | clip | freemask | maskcut."
    ),
    clip_model: Optional[str] = typer.Option(None, help="open_clip model name (default ViT-B-16)."),
    clip_checkpoint: Optional[str] = typer.Option(
        None, help="Local CLIP weights: a file, 'local-dir:FOLDER', or a cached open_clip tag."
    ),
    backbone_checkpoint: Optional[str] = typer.Option(
        None, help="Backbone weights for freemask / maskcut: a file or a `stage backbone` run."
    ),
    random_weights: Optional[bool] = typer.Option(
        None, "--random-weights",
        help="Run clip / freemask / maskcut without a checkpoint, on random weights (meaningless masks: "
             "speed and test runs only; refused otherwise)."),
    vocabulary: Optional[Path] = typer.Option(
        None, help="Class names, one per line (default: the 80 COCO names)."
    ),
    top_k: Optional[int] = typer.Option(
        None, help="At most this many masks per image, best score first (default 20; 0: no cap)."),
    min_score: Optional[float] = typer.Option(
        None, help="Drop masks scoring under this (default: the proposer's; freemask 0.5)."),
    min_area: Optional[int] = typer.Option(None, help="Smallest mask kept, px (default 32)."),
    shard_size: Optional[int] = typer.Option(None, help="Images per shard (default 64)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per model call (default 8)."),
    max_side: Optional[int] = typer.Option(None, help="Downscale larger images (default 1024)."),
    device: Optional[str] = typer.Option(None, help="auto (default) | cpu | cuda."),
    num_workers: Optional[int] = typer.Option(
        None, help="Ray actors (default 2); 0 runs in this process without Ray."
    ),
    ray_address: Optional[str] = typer.Option(
        None, help="Join this Ray cluster (default $RAY_ADDRESS, else a local Ray)."
    ),
    shards: Optional[str] = typer.Option(None, help="Run only these shards, e.g. 0,3-5."),
    shard_index: Optional[int] = typer.Option(None, help="Array task index I (with --num-shards)."),
    num_shards: Optional[int] = typer.Option(None, help="Array task count N: run shards k = I mod N."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Redo completed shards."),
    *,
    given: Given,
) -> None:
    """Masks Proposal: pseudo instance masks + prompt ingredients as Parquet shards."""
    from stages.propose import ProposeConfig, run_propose

    code = run_propose(given.load(ProposeConfig), progress=given.progress)
    if code:
        raise typer.Exit(code)



@stage_app.command("backbone", cls=config_command("stages.backbone:BackboneConfig"))
@user_errors
@config_options(RUN, PROGRESS, keys={"objective": "objective.name", "image_size": "data.image_size",
                                      "queue_size": "objective.queue_size", "max_steps": "train.max_steps",
                                      "batch_size": "data.batch_size", "lr": "train.lr"})
def stage_backbone(
    images: Optional[Path] = typer.Option(None, "--images", help="Manifest of the unlabeled images."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Whose backbone: tiny | small (default, ResNet-18) | lite (EfficientNet-Lite0) | base (ResNet-50)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="mocov2 (default) | densecl."),
    init: Optional[str] = typer.Option(
        None, "--init", help="Backbone weights to start from: a file, a run, or 'imagenet' (lite); default random."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="View side in px (default 224)."),
    queue_size: Optional[int] = typer.Option(
        None, "--queue-size", help="Negatives queue (default 4096; under half the images)."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 20000)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Global batch size, images (default 256)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="SGD learning rate (default 0.03)."),
    *,
    given: Given,
) -> None:
    """Self-supervised backbone pre-training (MoCo v2 / DenseCL) on unlabeled images; writes
    OUT/backbone.pt for --backbone-checkpoint."""
    from stages.backbone import BackboneConfig, run_backbone

    run_backbone(given.load(BackboneConfig), progress=given.progress)


@stage_app.command("pretrain", cls=config_command("stages.pretrain:PretrainConfig"))
@user_errors
@config_options(MODEL_TRAINING, RUN, PROGRESS, keys={
    "backbone_checkpoint": "model.backbone_checkpoint", "freeze_backbone": "model.freeze_backbone",
    "strategy": "prompt.strategy", "max_steps": "train.max_steps"})
def stage_pretrain(
    shards: Optional[Path] = typer.Option(None, "--shards", help="The propose stage's output folder."),
    backbone_checkpoint: Optional[str] = typer.Option(None, help="Local ResNet weights (e.g. MoCo v2)."),
    freeze_backbone: Optional[bool] = typer.Option(
        None, "--freeze-backbone/--train-backbone",
        help="Freeze the backbone (default: frozen when --backbone-checkpoint is given, as the "
             "reference freezes its MoCo backbone; trained otherwise)."),
    strategy: Optional[str] = typer.Option(None, help="Prompt-kernel matching: spread (default) | cosine | hungarian."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 10000)."),
    *,
    given: Given,
) -> None:
    """Prompt-kernel matching + kernel supervision on the proposal shards."""
    from stages.pretrain import PretrainConfig, run_pretrain

    run_pretrain(given.load(PretrainConfig), progress=given.progress)


@stage_app.command("finetune", cls=config_command("stages.finetune:FinetuneConfig"))
@user_errors
@config_options(MODEL_TRAINING, RUN, PROGRESS, keys={
    "backbone_checkpoint": "model.backbone_checkpoint", "freeze_backbone": "model.freeze_backbone",
    "max_steps": "train.max_steps", "eval_every": "train.eval_every"})
def stage_finetune(
    train_data: Optional[Path] = typer.Option(None, "--train", help="Labeled manifest to train on."),
    val_data: Optional[Path] = typer.Option(None, "--val", help="Labeled manifest for validation."),
    init: Optional[str] = typer.Option(
        None, "--init", help="Pretrain run folder or checkpoint, or none (from scratch, default)."),
    backbone_checkpoint: Optional[str] = typer.Option(
        None, help="Local backbone weights (e.g. a `stage backbone` run) for a scratch init."),
    freeze_backbone: Optional[bool] = typer.Option(
        None, "--freeze-backbone/--train-backbone",
        help="Freeze the backbone and its BatchNorm (default: trained, at --backbone-lr-mult)."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 2000)."),
    eval_every: Optional[int] = typer.Option(None, help="Validate every N steps (default 200)."),
    *,
    given: Given,
) -> None:
    """Fine-tune on a small labeled COCO-format set (from a pre-trained checkpoint or scratch)."""
    from stages.finetune import FinetuneConfig, run_finetune

    run_finetune(given.load(FinetuneConfig), progress=given.progress)


@stage_app.command("evaluate", cls=config_command("stages.evaluate:EvaluateConfig"))
@user_errors
@config_options(DEVICE, PROGRESS)
def stage_evaluate(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Fine-tuned checkpoint file or run folder (its latest)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labeled manifest to score on."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (metrics.json, predictions.json)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (default 2)."),
    short_side: Optional[int] = typer.Option(None, help="Resize short side (default 800)."),
    score_threshold: Optional[float] = typer.Option(None, help="Drop detections below (default 0)."),
    max_detections: Optional[int] = typer.Option(None, help="Detections per image (default 100)."),
    *,
    given: Given,
) -> None:
    """COCO mask AP (and box AP) of a checkpoint on a labeled manifest (exit 1: some images
    could not be read; they are listed and left out of the scores)."""
    from stages.evaluate import EXIT_SOME_IMAGES_UNREADABLE, EvaluateConfig, run_evaluate

    if run_evaluate(given.load(EvaluateConfig), progress=given.progress)["unreadable"]:
        raise typer.Exit(EXIT_SOME_IMAGES_UNREADABLE)