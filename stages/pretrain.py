"""`uplvp stage pretrain`: prompt-kernel matching + kernel supervision on proposal shards.

shards (docs/shards.md) -> streaming loader (pipeline.shard_dataset) -> PromptedModel (QEIS
model + prompt encoder + matching/injection) -> PretrainCriterion -> trainer (checkpoints,
resume, DDP, metrics) -> ``checkpoints/`` + ``stage.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict
from rich.console import Console

from pipeline.errors import InputError
from pipeline.run_record import now_iso, write_run_record
from pipeline.shard_dataset import MaskFilter, pretrain_loader, proposal_weights
from pipeline.text_embeddings import check_shard_labels, read_text_embeddings
from stages.config import StageConfig
from pipeline.engine import NonFiniteLossError, TrainConfig, init_distributed, seed_all, train
from stages.training_setup import DataSection, ModelSection, build_stage_model
from uplvp_model.criterion import PretrainCriterion
from uplvp_model.pretraining import PromptedModel, pretraining_targets
from uplvp_model.prompts import PromptEncoder

console = Console(stderr=True)


class PromptSection(BaseModel):
    """Prompt encoder ingredients and prompt-kernel matching (docs/prompts_and_losses.md)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["spread", "cosine", "hungarian"] = "spread"
    prompts_per_image: int = 20
    dropout: float = 0.1
    inject: bool = True  # False: pseudo-mask pre-training without prompt injection (ablation)
    use_pooled: bool = True
    use_position: bool = True
    use_shape: bool = True
    use_embedding: bool = True
    pool: Literal["box", "mask"] = "box"  # pooled part: inside each pseudo mask's box or mask


class LossSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    focal: float = 2.0
    bce: float = 1.0
    dice: float = 4.0
    embedding: float = 1.0
    text: float = 0.0  # CLIP text loss (needs shards of --proposer clip); 0 = off
    text_temperature: float = 0.07
    identity_warmup_steps: int | None = None  # None: a third of max_steps
    num_points: int | None = 12544  # point-sampled mask losses; None: full masks
    # which predictions assign pseudo masks to a decoder stage's kernels (before the identity
    # blend): "previous" (stage s from stage s - 1, K-Net's) or "own" (each stage from its own)
    stage_assignment: Literal["own", "previous"] = "previous"


class MaskFilterSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_score: float = 0.5
    min_area: int = 32
    max_masks: int = 20


class PretrainConfig(StageConfig):
    shards: Path  # the propose stage's output folder
    out: Path
    model: ModelSection = ModelSection()
    prompt: PromptSection = PromptSection()
    loss: LossSection = LossSection()
    masks: MaskFilterSection = MaskFilterSection()
    data: DataSection = DataSection()
    train: TrainConfig = TrainConfig(max_steps=10000, warmup_steps=500, checkpoint_every=1000)
    device: str = "auto"
    resume: bool = False

    HASH_EXCLUDE = frozenset({"out", "device", "resume"})


def build_pretraining_unit(cfg: PretrainConfig, grid_size: int, embedding_dim: int | None,
                           loader, device):
    """``(model_cfg, PromptedModel, PretrainCriterion, text embeddings or None)`` on ``device``:
    the QEIS model (seeded by ``cfg.train.seed``), the prompt encoder, the criterion (with the
    text projection when the text loss is on) and the prompted model that trains them."""
    model_cfg = cfg.model.build_config(num_classes=1, freeze_pretrained_backbone=True)
    seed_all(cfg.train.seed)  # the initial weights depend on the seed only, not on earlier RNG use
    model = build_stage_model(model_cfg)
    if model.backbone_load_report is not None:
        console.print(f"backbone checkpoint: {model.backbone_load_report.summary()}")
    p = cfg.prompt
    encoder = PromptEncoder(
        model_cfg.hidden_dim, embedding_dim if p.use_embedding else None, grid_size,
        use_pooled=p.use_pooled, use_position=p.use_position, use_shape=p.use_shape,
        use_embedding=p.use_embedding and embedding_dim is not None,
    )
    text = None
    if cfg.loss.text > 0:  # the vocabulary's text embeddings, as the propose stage cached them
        text = read_text_embeddings(cfg.shards)
        check_shard_labels(text, cfg.shards, [s.masks for s in loader.source.shards])
    warmup = cfg.loss.identity_warmup_steps or max(1, cfg.train.max_steps // 3)
    criterion = PretrainCriterion(
        focal_weight=cfg.loss.focal, bce_weight=cfg.loss.bce, dice_weight=cfg.loss.dice,
        embedding_weight=cfg.loss.embedding, identity_warmup_steps=warmup,
        num_points=cfg.loss.num_points, text_weight=cfg.loss.text,
        kernel_dim=model_cfg.hidden_dim if text is not None else None,
        text_dim=text.embeddings.shape[1] if text is not None else None,
        text_temperature=cfg.loss.text_temperature,
        stage_assignment=cfg.loss.stage_assignment,
    ).to(device)
    # the text projection lives in the trained module: optimised, DDP-synced, checkpointed
    prompted = PromptedModel(
        model, encoder, strategy=p.strategy, prompts_per_image=p.prompts_per_image,
        dropout=p.dropout, inject_prompts=p.inject, text_projection=criterion.text_projection,
    ).to(device)
    return model_cfg, prompted, criterion, text


def run_pretrain(cfg: PretrainConfig, progress: bool = True) -> dict:
    started = now_iso()
    grid_size = _proposal_grid_size(cfg.shards)
    info, device = init_distributed(cfg.device)
    loader = pretrain_loader(
        cfg.shards,
        cfg.data.batch_size,
        seed=cfg.data.seed,
        augment_config=cfg.data.augment(),
        mask_filter=MaskFilter(cfg.masks.min_score, cfg.masks.min_area, cfg.masks.max_masks),
        grid_size=grid_size,
        **cfg.data.worker_options(device),
    )
    embedding_dim = loader.source.embedding_dim
    model_cfg, prompted, criterion, text = build_pretraining_unit(cfg, grid_size, embedding_dim,
                                                                  loader, device)
    p = cfg.prompt
    text_embeddings = text.embeddings.to(device) if text is not None else None

    def loss_fn(module, batch, step):
        prompts = batch["prompts"]
        if p.pool == "mask":  # prompt m is pooled inside pseudo mask m (same order)
            prompts = [{**pr, "masks": t["masks"]} for pr, t in zip(prompts, batch["targets"])]
        outputs = module(batch["images"], prompts)
        targets = pretraining_targets(outputs, [t["masks"] for t in batch["targets"]])
        if text_embeddings is not None:
            for target, source in zip(targets, batch["targets"]):
                target.update(label_index=source["label_index"], text_embeddings=text_embeddings)
        return criterion(outputs, targets, kernel_to_prompt=outputs["kernel_to_prompt"],
                         step=step)

    counts = loader.source.counts
    weights = proposal_weights(loader.source.shards)
    if weights is not None and weights.get("kind") == "random":
        console.print(f"[yellow]warning: these shards were made by RANDOM weights "
                      f"({weights.get('source')}): their pseudo masks are meaningless, so is "
                      f"pre-training on them (speed / test run)[/yellow]")
    console.print(
        f"pretrain: {len(loader.source)} images with pseudo masks "
        f"({_format_counts(counts)}), model {cfg.model.preset}/{cfg.model.decoder}, "
        f"prompts {p.strategy}{'' if p.inject else ' (not injected)'}, stage assignment "
        f"{criterion.stage_assignment}, device {device}"
    )
    if text is not None:
        console.print(f"text loss: weight {cfg.loss.text}, {len(text.names)} names "
                      f"({text.model_key})")
    train_cfg = cfg.train.model_copy(update={"progress": cfg.train.progress and progress})
    try:
        result = train(
            prompted, loss_fn, loader.make_batches, train_cfg, cfg.out, resume=cfg.resume,
            label="pretrain",
            extra_state={
                "stage": "pretrain",
                "model_config": model_cfg.to_dict(),
                "stage_config": cfg.resolved(),
            },
        )
    except NonFiniteLossError as err:
        # on_nan=stop: one line naming the run's metrics file, which lists the batch's image ids
        raise InputError(f"training stopped: {err}", Path(cfg.out) / "metrics.jsonl") from None
    summary = {"step": result.step, "checkpoint": str(result.checkpoint), **counts}
    if info.rank == 0:
        write_run_record(
            cfg.out, stage="pretrain", config=cfg.resolved(), config_hash=cfg.config_hash(),
            inputs={"shards": str(cfg.shards), "proposal_weights": weights}, counts=summary,
            started_at=started,
        )
        console.print(f"pretrain done: step {result.step}, checkpoint {result.checkpoint}")
    return summary


def _proposal_grid_size(shards: Path) -> int:
    """The shape-grid size the propose run used (its stage.json), default 32."""
    record = Path(shards) / "stage.json"
    if not Path(shards).is_dir():
        raise InputError("shards folder not found", shards)
    if not record.is_file():
        return 32
    try:
        return int(json.loads(record.read_text())["config"]["grid_size"])
    except (ValueError, KeyError, TypeError):
        raise InputError("stage.json has no config.grid_size (is this a propose run?)",
                         record) from None


def _format_counts(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if isinstance(v, (int, float)))
