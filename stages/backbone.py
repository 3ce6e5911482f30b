"""`uplvp stage backbone`: pre-train a backbone without labels on an unlabeled manifest.

manifest -> two augmented views per image (``pipeline.ssl_views``) -> query / momentum encoder
pair with MoCo v2 or DenseCL losses (``uplvp_model.self_supervised``, on lightly's heads and
losses) -> trainer (SGD, checkpoints, exact resume, NaN guard, DDP under torchrun) ->
``checkpoints/`` + ``backbone.pt`` + ``stage.json``.

``backbone.pt`` (docs/backbone.md) holds only the query encoder's backbone, under the keys
``backbone.body.*`` with the backbone's name: it loads strictly as ``--backbone-checkpoint`` of
``propose`` (freemask / maskcut), ``pretrain``, ``finetune`` and the Mask R-CNN peer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from pipeline.errors import InputError
from pipeline.run_record import now_iso, write_run_record
from pipeline.ssl_views import view_loader
from stages.config import StageConfig
from pipeline.engine import NonFiniteLossError, TrainConfig, init_distributed, seed_all, train
from uplvp_model.backbone import build_backbone
from uplvp_model.checkpoint import (
    BACKBONE_FILE,
    load_backbone_checkpoint,
    load_model_state,
    save_state,
)
from uplvp_model.imagenet_weights import IMAGENET, imagenet_lite0_state
from uplvp_model.config import model_config
from uplvp_model.self_supervised import SelfSupervisedModel, backbone_state

console = Console(stderr=True)


class ObjectiveSection(BaseModel):
    """The self-supervised objective (docs/backbone.md)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["mocov2", "densecl"] = "mocov2"
    projection_dim: int = Field(128, gt=0)
    hidden_dim: int = Field(2048, gt=0)
    # keys in the queue of negatives; keep it under about half the images (a queue that still
    # holds an image's previous key makes its own positive a negative)
    queue_size: int = Field(4096, gt=0)
    dense_queue_size: int = Field(4096, gt=0)  # densecl's queue of dense keys
    temperature: float = Field(0.2, gt=0)
    momentum: float = Field(0.99, ge=0, lt=1)  # key-encoder EMA factor per step
    dense_weight: float = Field(0.5, ge=0, le=1)  # densecl's lambda


class ViewsSection(BaseModel):
    """The two augmented views (MoCo v2's augmentation) and their loader."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(224, ge=32)  # side of each square view
    min_scale: float = Field(0.2, gt=0, le=1)  # random resized crop's smallest area share
    max_side: int | None = 512  # downscale larger images before cropping
    batch_size: int = Field(256, gt=0)  # global (summed over processes)
    num_workers: int = Field(2, ge=0)
    persistent_workers: bool = True
    seed: int = 0


class BackboneConfig(StageConfig):
    images: Path  # manifest of the unlabeled images (labels, if any, are not read)
    out: Path
    preset: Literal["tiny", "small", "lite", "base"] = "small"  # which backbone: the model preset's
    # backbone weights to start from: a file / run folder, or "imagenet" (the lite preset's
    # installable ImageNet weights); None: random
    init: str | None = None
    objective: ObjectiveSection = ObjectiveSection()
    data: ViewsSection = ViewsSection()
    # MoCo v2's recipe: SGD, lr 0.03 per 256 images, weight decay 1e-4, cosine, no clipping
    train: TrainConfig = TrainConfig(max_steps=20000, optimizer="sgd", lr=0.03,
                                     weight_decay=1e-4, warmup_steps=0, grad_clip=None,
                                     checkpoint_every=500)
    device: str = "auto"
    resume: bool = False

    HASH_EXCLUDE = frozenset({"out", "device", "resume"})


def preset_backbone(preset: str) -> tuple[str, tuple[int, int, int, int]]:
    """(backbone name, tiny channels) of a model preset."""
    cfg = model_config(preset)
    return cfg.backbone, cfg.tiny_channels


def run_backbone(cfg: BackboneConfig, progress: bool = True) -> dict:
    started = now_iso()
    info, device = init_distributed(cfg.device)
    d = cfg.data
    loader = view_loader(
        cfg.images, d.batch_size, image_size=d.image_size, min_scale=d.min_scale,
        max_side=d.max_side, seed=d.seed, num_workers=d.num_workers,
        persistent_workers=d.persistent_workers, pin_memory=device.type == "cuda")
    num_images = len(loader.source)
    name, tiny_channels = preset_backbone(cfg.preset)
    seed_all(cfg.train.seed)  # the initial weights depend on the seed only
    backbone = build_backbone(name, tiny_channels)
    init_report = None
    if cfg.init is not None:
        try:
            init_report = load_init(backbone, name, cfg.init)
        except ValueError as err:
            raise InputError(f"init: {err}") from None
    o = cfg.objective
    model = SelfSupervisedModel(
        backbone, o.name, projection_dim=o.projection_dim, hidden_dim=o.hidden_dim,
        queue_size=o.queue_size, dense_queue_size=o.dense_queue_size,
        temperature=o.temperature, momentum=o.momentum, dense_weight=o.dense_weight,
    ).to(device)
    steps_per_epoch = loader.batches_per_epoch()
    if info.rank == 0:
        if init_report is not None:
            console.print(f"init {cfg.init}: {init_report.summary().splitlines()[0]}")
        if o.queue_size > num_images // 2:
            console.print(f"[yellow]warning: queue_size {o.queue_size} is more than half of "
                          f"the {num_images} images: the queue will hold earlier keys of the "
                          f"images it contrasts (lower objective.queue_size)[/yellow]")
        console.print(
            f"backbone: {num_images} images, {name} ({cfg.preset}), {o.name}, views "
            f"{d.image_size} px, batch {d.batch_size}, {steps_per_epoch} steps per epoch, "
            f"{cfg.train.max_steps} steps (~{cfg.train.max_steps / steps_per_epoch:.1f} "
            f"epochs), device {device}")

    def loss_fn(module, batch, step):
        return module(batch["view_q"], batch["view_k"])

    train_cfg = cfg.train.model_copy(update={"progress": cfg.train.progress and progress})
    extra = {"stage": "backbone", "backbone": name, "tiny_channels": list(tiny_channels),
             "stage_config": cfg.resolved()}
    try:
        result = train(model, loss_fn, loader.make_batches, train_cfg, cfg.out,
                       resume=cfg.resume, label="backbone", extra_state=extra)
    except NonFiniteLossError as err:
        raise InputError(f"training stopped: {err}", Path(cfg.out) / "metrics.jsonl") from None
    out_file = Path(cfg.out) / BACKBONE_FILE
    summary = {"step": result.step, "epochs": round(result.step / steps_per_epoch, 2),
               "images": num_images, "backbone_checkpoint": str(out_file)}
    if info.rank == 0:
        export_backbone(out_file, model, name, tiny_channels, objective=o.name,
                        step=result.step, init=cfg.init, config_hash=cfg.config_hash())
        write_run_record(
            cfg.out, stage="backbone", config=cfg.resolved(), config_hash=cfg.config_hash(),
            inputs={"images": str(cfg.images), "init": cfg.init}, counts=summary,
            started_at=started)
        console.print(f"backbone done: step {result.step}, {out_file}")
    return summary


def export_backbone(path: Path, model: SelfSupervisedModel, name: str,
                    tiny_channels: tuple[int, ...], **extra) -> None:
    """Write ``backbone.pt`` (docs/backbone.md): the query encoder's backbone under
    ``backbone.body.*``, its architecture (``backbone``, ``tiny_channels``), ``stage`` and
    ``extra`` (objective, step, init, config hash), atomically."""
    save_state(path, backbone_state(model), {
        "stage": "backbone", "backbone": name, "tiny_channels": list(tiny_channels), **extra})


def load_init(backbone, name: str, init: str):
    """Load the stage's starting weights into ``backbone.body`` (strictly): ``imagenet``, the
    installable EfficientNet-Lite0 ImageNet weights (``lite`` preset), or any backbone
    checkpoint file / run folder. Returns the load report; ``ValueError`` on a misfit."""
    if init != IMAGENET:
        return load_backbone_checkpoint(backbone.body, init)
    if name != "efficientnet_lite0":
        raise ValueError(f"'imagenet' weights exist for the lite preset (EfficientNet-Lite0) "
                         f"only, not for {name}")
    report = load_model_state(backbone.body, imagenet_lite0_state())
    misfit = report.misfit()
    if misfit:
        raise ValueError(f"ImageNet EfficientNet-Lite0 weights do not fit: {misfit}")
    return report
