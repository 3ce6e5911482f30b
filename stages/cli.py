"""The `uplvp` command line (typer).

    uplvp stage propose|pretrain|finetune|evaluate   the pipeline stages
    uplvp data synth|split|convert|check             datasets
    uplvp inspect masks|overlay|run                  look at stage outputs
    uplvp predict                                    inference on new images
    uplvp export                                     a fine-tuned checkpoint to ONNX
    uplvp demo                                       the whole pipeline on embedded demo data

Every command reads ``--config FILE.yaml`` and CLI options into one typed config; bad input
prints one ``error: ...`` line on stderr and exits with code 2.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Optional

import typer

from stages.config import load_config
from stages.errors import fail, user_errors

app = typer.Typer(
    name="uplvp",
    help="UPLVP: unsupervised pre-training with language-vision prompts for low-data "
    "instance segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
stage_app = typer.Typer(help="Pipeline stages (each reruns alone and resumes).", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: demo data, low-data splits, converters.", no_args_is_help=True)
convert_app = typer.Typer(help="Convert other formats to COCO instances JSON.", no_args_is_help=True)
inspect_app = typer.Typer(help="Inspect stage outputs.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(data_app, name="data")
data_app.add_typer(convert_app, name="convert")
app.add_typer(inspect_app, name="inspect")

ConfigOpt = typer.Option(None, "--config", help="YAML file of options; CLI options override it.")
SetOpt = typer.Option(
    None, "--set", metavar="KEY=VALUE",
    help="Any config field, also one without an option here: key=value, dotted for sections "
         "(--set train.lr=1e-3 --set model.overrides.dropout=0.1); the value is read as YAML; "
         "applied last (after --config and the options above).")
NoProgressOpt = typer.Option(
    False, "--no-progress",
    help="No progress bars: plain progress lines, as printed where stderr is not a terminal.")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"uplvp {metadata.version('uplvp')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """UPLVP pipeline: propose -> pretrain -> finetune -> evaluate."""


# --------------------------------------------------------------------------- stages


@stage_app.command("propose")
@user_errors
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
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Masks Proposal: pseudo instance masks + prompt ingredients as Parquet shards."""
    from stages.propose import ProposeConfig, run_propose

    cfg = load_config(
        ProposeConfig,
        config,
        dict(
            images=images, out=out, proposer=proposer, clip_model=clip_model,
            clip_checkpoint=clip_checkpoint, backbone_checkpoint=backbone_checkpoint,
            random_weights=random_weights, vocabulary=vocabulary, min_score=min_score,
            top_k=top_k, min_area=min_area, shard_size=shard_size,
            batch_size=batch_size, max_side=max_side, device=device, num_workers=num_workers,
            ray_address=ray_address, shards=shards, shard_index=shard_index,
            num_shards=num_shards, overwrite=overwrite,
        ), sets)
    code = run_propose(cfg, progress=not no_progress)
    if code:
        raise typer.Exit(code)


DeviceOpt = typer.Option(None, "--device", help="auto (default) | cpu | cuda.")
ResumeOpt = typer.Option(None, "--resume", help="Continue from OUT/checkpoints/latest.")
OnNanOpt = typer.Option(
    None, "--on-nan", help="Non-finite loss: skip the batch group (default) | stop (exit 2).")
CheckpointEveryOpt = typer.Option(None, "--checkpoint-every", help="Save a checkpoint every N steps.")
AllowPartialInitOpt = typer.Option(
    None, "--allow-partial-init",
    help="Load only the tensors that fit from the backbone checkpoint (and finetune's --init); "
         "default: a checkpoint of another depth or width is an error.")
NormOpt = typer.Option(
    None, "--norm", help="Backbone BatchNorm: auto (default: frozen with a backbone checkpoint, "
                         "else bn) | frozen | bn | syncbn (DDP on CUDA).")
BackboneLrOpt = typer.Option(
    None, "--backbone-lr-mult", help="Backbone learning rate / --lr (default 1; Mask2Former: 0.1).")
# options that pretrain and finetune share (their defaults live in the stage configs)
RunOutOpt = typer.Option(None, "--out", help="Run folder (checkpoints/, metrics).")
PresetOpt = typer.Option(None, "--preset", help="Model preset: tiny | small (default) | lite | base.")
DecoderOpt = typer.Option(None, "--decoder", help="knet (default) | mask2former.")
BatchSizeOpt = typer.Option(None, "--batch-size", help="Global batch size (default 16).")
LrOpt = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-4).")
NumWorkersOpt = typer.Option(None, "--num-workers", help="DataLoader workers (default 2).")
SeedOpt = typer.Option(None, "--seed", help="Seed of data order and augmentation (default 0).")
AmpOpt = typer.Option(None, "--amp", help="Mixed precision on CUDA: off (default) | bf16 | fp16.")
AccumulationOpt = typer.Option(
    None, "--accumulation-steps", help="Batches per optimizer step (default 1).")


def training_overrides(*, out, preset, decoder, max_steps, batch_size, lr, num_workers, seed,
                       device, resume, on_nan, checkpoint_every, amp=None,
                       accumulation_steps=None) -> dict:
    """Config overrides of the options pretrain and finetune share."""
    return {
        "out": out, "model.preset": preset, "model.decoder": decoder,
        "train.max_steps": max_steps, "data.batch_size": batch_size, "train.lr": lr,
        "data.num_workers": num_workers, "data.seed": seed, "device": device, "resume": resume,
        "train.on_nan": on_nan, "train.checkpoint_every": checkpoint_every, "train.amp": amp,
        "train.accumulation_steps": accumulation_steps,
    }


@stage_app.command("backbone")
@user_errors
def stage_backbone(
    images: Optional[Path] = typer.Option(None, "--images", help="Manifest of the unlabeled images."),
    out: Optional[Path] = RunOutOpt,
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Whose backbone: tiny | small (default, ResNet-18) | lite (EfficientNet-Lite0) | base (ResNet-50)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="mocov2 (default) | densecl."),
    init: Optional[str] = typer.Option(
        None, "--init", help="Backbone weights to start from: a file, a run, or 'imagenet' (lite); default random."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="View side in px (default 224)."),
    queue_size: Optional[int] = typer.Option(
        None, "--queue-size", help="Negatives queue (default 4096; under half the images)."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 20000)."),
    batch_size: Optional[int] = BatchSizeOpt,
    lr: Optional[float] = typer.Option(None, "--lr", help="SGD learning rate (default 0.03)."),
    num_workers: Optional[int] = NumWorkersOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    resume: Optional[bool] = ResumeOpt,
    on_nan: Optional[str] = OnNanOpt,
    checkpoint_every: Optional[int] = CheckpointEveryOpt,
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Self-supervised backbone pre-training (MoCo v2 / DenseCL) on unlabeled images; writes
    OUT/backbone.pt for --backbone-checkpoint."""
    from stages.backbone import BackboneConfig, run_backbone

    cfg = load_config(BackboneConfig, config, {
        "images": images, "out": out, "preset": preset, "objective.name": objective,
        "init": init, "data.image_size": image_size, "objective.queue_size": queue_size,
        "train.max_steps": max_steps, "data.batch_size": batch_size, "train.lr": lr,
        "data.num_workers": num_workers, "data.seed": seed, "device": device, "resume": resume,
        "train.on_nan": on_nan, "train.checkpoint_every": checkpoint_every,
    }, sets)
    run_backbone(cfg, progress=not no_progress)


@stage_app.command("pretrain")
@user_errors
def stage_pretrain(
    shards: Optional[Path] = typer.Option(None, "--shards", help="The propose stage's output folder."),
    out: Optional[Path] = RunOutOpt,
    preset: Optional[str] = PresetOpt,
    decoder: Optional[str] = DecoderOpt,
    backbone_checkpoint: Optional[str] = typer.Option(None, help="Local ResNet weights (e.g. MoCo v2)."),
    freeze_backbone: Optional[bool] = typer.Option(
        None, "--freeze-backbone/--train-backbone",
        help="Freeze the backbone (default: frozen when --backbone-checkpoint is given, as the "
             "reference freezes its MoCo backbone; trained otherwise)."),
    norm: Optional[str] = NormOpt,
    backbone_lr_mult: Optional[float] = BackboneLrOpt,
    allow_partial_init: Optional[bool] = AllowPartialInitOpt,
    strategy: Optional[str] = typer.Option(None, help="Prompt-kernel matching: spread (default) | cosine | hungarian."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 10000)."),
    batch_size: Optional[int] = BatchSizeOpt,
    lr: Optional[float] = LrOpt,
    num_workers: Optional[int] = NumWorkersOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    resume: Optional[bool] = ResumeOpt,
    on_nan: Optional[str] = OnNanOpt,
    checkpoint_every: Optional[int] = CheckpointEveryOpt,
    amp: Optional[str] = AmpOpt,
    accumulation_steps: Optional[int] = AccumulationOpt,
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Prompt-kernel matching + kernel supervision on the proposal shards."""
    from stages.pretrain import PretrainConfig, run_pretrain

    cfg = load_config(PretrainConfig, config, {
        "shards": shards, "model.backbone_checkpoint": backbone_checkpoint,
        "model.freeze_backbone": freeze_backbone, "prompt.strategy": strategy,
        "model.allow_partial_init": allow_partial_init, "model.norm": norm,
        "train.backbone_lr_multiplier": backbone_lr_mult,
        **training_overrides(
            out=out, preset=preset, decoder=decoder, max_steps=max_steps, batch_size=batch_size,
            lr=lr, num_workers=num_workers, seed=seed, device=device, resume=resume,
            on_nan=on_nan, checkpoint_every=checkpoint_every, amp=amp,
            accumulation_steps=accumulation_steps),
    }, sets)
    run_pretrain(cfg, progress=not no_progress)


@stage_app.command("finetune")
@user_errors
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
    allow_partial_init: Optional[bool] = AllowPartialInitOpt,
    norm: Optional[str] = NormOpt,
    backbone_lr_mult: Optional[float] = BackboneLrOpt,
    out: Optional[Path] = RunOutOpt,
    preset: Optional[str] = PresetOpt,
    decoder: Optional[str] = DecoderOpt,
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (default 2000)."),
    batch_size: Optional[int] = BatchSizeOpt,
    lr: Optional[float] = LrOpt,
    eval_every: Optional[int] = typer.Option(None, help="Validate every N steps (default 200)."),
    num_workers: Optional[int] = NumWorkersOpt,
    seed: Optional[int] = SeedOpt,
    device: Optional[str] = DeviceOpt,
    resume: Optional[bool] = ResumeOpt,
    on_nan: Optional[str] = OnNanOpt,
    checkpoint_every: Optional[int] = CheckpointEveryOpt,
    amp: Optional[str] = AmpOpt,
    accumulation_steps: Optional[int] = AccumulationOpt,
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Fine-tune on a small labeled COCO-format set (from a pre-trained checkpoint or scratch)."""
    from stages.finetune import FinetuneConfig, run_finetune

    cfg = load_config(FinetuneConfig, config, {
        "train_data": train_data, "val_data": val_data, "init": init,
        "model.backbone_checkpoint": backbone_checkpoint, "model.freeze_backbone": freeze_backbone,
        "model.allow_partial_init": allow_partial_init, "model.norm": norm,
        "train.backbone_lr_multiplier": backbone_lr_mult, "train.eval_every": eval_every,
        **training_overrides(
            out=out, preset=preset, decoder=decoder, max_steps=max_steps, batch_size=batch_size,
            lr=lr, num_workers=num_workers, seed=seed, device=device, resume=resume,
            on_nan=on_nan, checkpoint_every=checkpoint_every, amp=amp,
            accumulation_steps=accumulation_steps),
    }, sets)
    run_finetune(cfg, progress=not no_progress)


@stage_app.command("evaluate")
@user_errors
def stage_evaluate(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Fine-tuned checkpoint file or run folder (its latest)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labeled manifest to score on."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (metrics.json, predictions.json)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (default 2)."),
    short_side: Optional[int] = typer.Option(None, help="Resize short side (default 800)."),
    score_threshold: Optional[float] = typer.Option(None, help="Drop detections below (default 0)."),
    max_detections: Optional[int] = typer.Option(None, help="Detections per image (default 100)."),
    device: Optional[str] = DeviceOpt,
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """COCO mask AP (and box AP) of a checkpoint on a labeled manifest (exit 1: some images
    could not be read; they are listed and left out of the scores)."""
    from stages.evaluate import EXIT_SOME_IMAGES_UNREADABLE, EvaluateConfig, run_evaluate

    cfg = load_config(EvaluateConfig, config, dict(
        checkpoint=checkpoint, data=data, out=out, batch_size=batch_size, short_side=short_side,
        score_threshold=score_threshold, max_detections=max_detections, device=device), sets)
    if run_evaluate(cfg, progress=not no_progress)["unreadable"]:
        raise typer.Exit(EXIT_SOME_IMAGES_UNREADABLE)


@app.command("predict")
@user_errors
def predict(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Fine-tuned checkpoint file or run folder (its latest)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images or a manifest."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder."),
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (default 2)."),
    short_side: Optional[int] = typer.Option(None, help="Resize short side (default 800)."),
    score_threshold: Optional[float] = typer.Option(None, help="Keep detections from (default 0.5)."),
    overlays: Optional[bool] = typer.Option(None, "--overlays", help="Also write overlay PNGs."),
    device: Optional[str] = DeviceOpt,
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Inference on new images: COCO results JSON and optional overlays (exit 1: some images
    could not be read; the others are predicted, the failed listed in OUT/unreadable.json)."""
    from stages.evaluate import EXIT_SOME_IMAGES_UNREADABLE
    from stages.predict import PredictConfig, run_predict

    cfg = load_config(PredictConfig, config, dict(
        checkpoint=checkpoint, images=images, out=out, batch_size=batch_size,
        short_side=short_side, score_threshold=score_threshold, overlays=overlays, device=device), sets)
    if run_predict(cfg, progress=not no_progress)["num_unreadable"]:
        raise typer.Exit(EXIT_SOME_IMAGES_UNREADABLE)


@inspect_app.command("masks")
@user_errors
def inspect_masks(
    shard_dir: Path = typer.Argument(..., help="A propose output folder."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON."),
) -> None:
    """Counts per label, score/area histograms, images without masks or unreadable."""
    from stages.inspect_masks import run_inspect_masks

    run_inspect_masks(shard_dir, json_out)


@inspect_app.command("overlay")
@user_errors
def inspect_overlay(
    shard_dir: Path = typer.Argument(..., help="A propose output folder."),
    image_id: int = typer.Option(..., "--image-id", help="The image's id (see images/ shards)."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
    min_score: float = typer.Option(0.0, help="Draw masks scoring at least this."),
    max_masks: int = typer.Option(20, help="Draw at most this many (best first)."),
) -> None:
    """Draw one image's pseudo masks (fill, contour, box, label and score) on it."""
    from stages.inspect_masks import draw_overlay

    result = draw_overlay(shard_dir, image_id, out, min_score=min_score, max_masks=max_masks)
    typer.echo(f"wrote {result.path}: {result.masks_drawn} of {result.masks_total} masks of "
               f"image {result.image_id} ({result.image_path})")


@inspect_app.command("run")
@user_errors
def inspect_run(
    run_dir: Path = typer.Argument(..., help="A pretrain or finetune run folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG path (default RUN/curves.png)."),
) -> None:
    """Plot a training run's loss and AP curves (from its metrics.jsonl) to a PNG."""
    from stages.inspect_run import plot_run

    typer.echo(f"wrote {plot_run(run_dir, out)}")


# --------------------------------------------------------------------------- data


@data_app.command("synth")
@user_errors
def data_synth(
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default 0)."),
    num_unlabeled: Optional[int] = typer.Option(None, help="Unlabeled pool size (default 300)."),
    num_train: Optional[int] = typer.Option(None, help="Labeled train images (default 60)."),
    num_val: Optional[int] = typer.Option(None, help="Labeled val images (default 60)."),
    image_size: Optional[int] = typer.Option(None, help="Base image side in px (default 128)."),
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Write the deterministic synthetic demo dataset: unlabeled pool, train and val sets
    (COCO JSON, polygon segmentations) and their manifests."""
    from stages.data import SynthConfig, run_synth

    cfg = load_config(
        SynthConfig,
        config,
        dict(
            out=out,
            seed=seed,
            num_unlabeled=num_unlabeled,
            num_train=num_train,
            num_val=num_val,
            image_size=image_size,
        ), sets)
    run_synth(cfg, progress=not no_progress)


@data_app.command("split", context_settings={"allow_extra_args": True})
@user_errors
def data_split(
    ctx: typer.Context,
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="COCO JSON to split."),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", help="Labeled manifest to split (instead of --annotations)."
    ),
    images_root: Optional[Path] = typer.Option(
        None, "--images-root", help="Image folder for the written manifests."
    ),
    percent: Optional[list[str]] = typer.Option(
        None, "--percent", help="Percentages, e.g. --percent 1 5 10 (default 1 5 10)."
    ),
    seed: Optional[list[int]] = typer.Option(None, "--seed", help="Seed(s) (default 1)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (default: beside the annotations)."
    ),
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
) -> None:
    """Seeded image-level low-data subsets, named like instances_train2017.{seed}@{percent}.json,
    plus a manifest for each. One seed gives nested subsets (1% in 5% in 10%)."""
    from stages.data import SplitConfig, run_split

    percents = _parse_numbers("--percent", (percent or []) + list(ctx.args))
    cfg = load_config(
        SplitConfig,
        config,
        dict(
            annotations=annotations,
            manifest=manifest,
            images_root=images_root,
            percent=percents or None,
            seed=seed or None,
            out=out,
        ), sets)
    run_split(cfg)


def _parse_numbers(option: str, values: list[str]) -> list[float]:
    """``['1', '5,10']`` -> ``[1.0, 5.0, 10.0]``; anything else is one error line."""
    numbers = []
    for value in values:
        for part in str(value).split(","):
            if not part.strip():
                continue
            try:
                numbers.append(float(part))
            except ValueError:
                raise fail(f"{option}: '{part}' is not a number") from None
    return numbers


@convert_app.command("cityscapes")
@user_errors
def convert_cityscapes(
    root: Optional[Path] = typer.Option(None, "--root", help="Cityscapes root (gtFine/, leftImg8bit/)."),
    split: Optional[str] = typer.Option(None, "--split", help="train | val | test (default train)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output COCO JSON."),
    min_area: Optional[int] = typer.Option(None, help="Drop instances smaller than this (px)."),
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """Cityscapes gtFine *_instanceIds.png -> COCO instances JSON (8 instance classes)."""
    from stages.data import CityscapesConfig, run_convert_cityscapes

    cfg = load_config(
        CityscapesConfig, config, dict(root=root, split=split, out=out, min_area=min_area), sets)
    run_convert_cityscapes(cfg, progress=not no_progress)


@convert_app.command("ctw1500")
@user_errors
def convert_ctw1500(
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of CTW1500 images."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Folder of label .txt files."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output COCO JSON."),
    label_format: Optional[str] = typer.Option(
        None, "--label-format", help="auto | curve | polygon (default auto)."
    ),
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """CTW1500 curved-text polygons -> COCO instances JSON (one category: text)."""
    from stages.data import Ctw1500Config, run_convert_ctw1500

    cfg = load_config(
        Ctw1500Config,
        config,
        dict(images=images, labels=labels, out=out, label_format=label_format), sets)
    run_convert_ctw1500(cfg, progress=not no_progress)


@data_app.command("check")
@user_errors
def data_check(manifest: Path = typer.Argument(..., help="Manifest YAML to validate.")) -> None:
    """Validate a dataset manifest (and its COCO file) and print a summary."""
    from stages.data import run_check

    run_check(manifest)


# --------------------------------------------------------------------------- demo


@app.command("demo")
@user_errors
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
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    no_progress: bool = NoProgressOpt,
) -> None:
    """The whole pipeline on embedded synthetic data: synth -> propose -> pretrain -> finetune
    from the pre-trained kernels and from scratch (same budget) -> evaluate -> comparison."""
    from stages.demo import DemoConfig, run_demo

    cfg = load_config(DemoConfig, config, dict(
        out=out, seed=seed, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps,
        propose_workers=propose_workers, proposer=proposer, clip_model=clip_model,
        clip_checkpoint=clip_checkpoint), sets)
    run_demo(cfg, progress=not no_progress)


@app.command("export")
@user_errors
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
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
) -> None:
    """Export a fine-tuned checkpoint to ONNX: uint8 image [1, 3, H, W] in (any size), mask
    probabilities, scores and category ids out (needs the export extra; docs/export.md)."""
    from stages.export import ExportConfig, run_export

    cfg = load_config(ExportConfig, config, dict(
        checkpoint=checkpoint, out=out, opset=opset, max_detections=max_detections,
        short_side=short_side, max_long_side=max_long_side, torchscript=torchscript,
        verify=verify), sets)
    run_export(cfg)


def main() -> None:
    app(prog_name="uplvp")


if __name__ == "__main__":
    main()
