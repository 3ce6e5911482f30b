"""`uplvp stage finetune`: train on a small labeled COCO set, from a pre-trained checkpoint or
from scratch (``--init none``, otherwise identical settings), validating periodically.

train manifest -> COCO loader -> QEIS model (class head for the dataset's categories;
pre-trained weights loaded except the class head) -> SetCriterion -> trainer -> ``checkpoints/``
(latest, resumable) + ``checkpoints/best.pt`` (best validation mask AP) + ``stage.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from rich.console import Console

from pipeline.coco_dataset import category_ids as sorted_category_ids
from pipeline.coco_dataset import eval_loader, finetune_loader
from pipeline.errors import InputError
from pipeline.manifest import Dataset, load_manifest
from pipeline.run_record import now_iso, write_run_record
from stages.config import StageConfig
from pipeline.evaluation import evaluate_model, flat_metrics
from pipeline.engine.checkpoint import latest_checkpoint, load_training_checkpoint
from pipeline.engine import (
    BestCheckpointer,
    NonFiniteLossError,
    TrainConfig,
    init_distributed,
    seed_all,
    train,
)
from stages.training_setup import DataSection, ModelSection, build_stage_model
from uplvp_model.checkpoint import load_model_state
from uplvp_model.criterion import SetCriterion, reference_mask_weights
from uplvp_model.model import QEISModel

console = Console(stderr=True)

BEST_NAME = "best.pt"
PRIMARY_METRIC = "val/segm_AP"


class FinetuneConfig(StageConfig):
    train_data: Path  # labeled manifest (COCO annotations)
    val_data: Path | None = None  # labeled manifest for periodic validation
    init: str = "none"  # a pretrain run folder or checkpoint file, or "none" (from scratch)
    init_skip: list[str] = []  # tensors whose name contains one of these stay re-initialised
    out: Path
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainConfig = TrainConfig(max_steps=2000, warmup_steps=100, eval_every=200,
                                     checkpoint_every=200)
    no_object_weight: float = 0.1
    num_points: int | None = 12544  # point-sampled mask losses; None: full masks (small images)
    ce_weight: float = 2.0  # loss weights (and matching cost weights)
    bce_weight: float | None = None  # None: the decoder's reference, knet 1, mask2former 5
    dice_weight: float | None = None  # None: knet 4, mask2former 5
    importance_sample_ratio: float = 0.0  # share of the points at the least certain places
    oversample_ratio: float = 3.0  # candidates per point for importance sampling
    # which predictions assign targets to a decoder stage's kernels: "previous" (stage s from
    # stage s - 1, K-Net's) or "own" (each stage from its own, DETR's and Mask2Former's)
    stage_assignment: Literal["own", "previous"] = "previous"
    device: str = "auto"
    resume: bool = False

    HASH_EXCLUDE = frozenset({"out", "device", "resume"})


def mask_weights(cfg: FinetuneConfig, decoder: str) -> dict[str, float]:
    """``bce_weight`` / ``dice_weight`` of ``cfg``, each None replaced by the decoder's
    reference (:func:`~uplvp_model.criterion.reference_mask_weights`)."""
    reference = reference_mask_weights(decoder)
    return {"bce_weight": reference["bce"] if cfg.bce_weight is None else cfg.bce_weight,
            "dice_weight": reference["dice"] if cfg.dice_weight is None else cfg.dice_weight}


def load_datasets(cfg: FinetuneConfig) -> tuple[Dataset, Dataset | None, list[int]]:
    """(train set, val set or None, category ids): both labeled, with the same categories
    (one :class:`InputError` line otherwise)."""
    train_set = load_manifest(cfg.train_data)
    if not train_set.labeled:
        raise InputError("the fine-tuning manifest has no annotations", cfg.train_data)
    category_ids = sorted_category_ids(train_set.categories)
    val_set = None
    if cfg.val_data is not None:
        val_set = load_manifest(cfg.val_data)
        if not val_set.labeled:
            raise InputError("the validation manifest has no annotations", cfg.val_data)
        if sorted_category_ids(val_set.categories) != category_ids:
            raise InputError("validation categories differ from the training categories",
                             cfg.val_data)
    return train_set, val_set, category_ids


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    started = now_iso()
    train_set, val_set, category_ids = load_datasets(cfg)
    info, device = init_distributed(cfg.device)
    model_cfg = cfg.model.build_config(num_classes=len(category_ids))
    seed_all(cfg.train.seed)  # the initial weights depend on the seed only, not on earlier RNG use
    model = build_stage_model(model_cfg)
    init_report = initialise_from(model, cfg.init, cfg.init_skip,
                                  allow_partial=cfg.model.allow_partial_init)
    model.to(device)
    criterion = SetCriterion(
        ce_weight=cfg.ce_weight, **mask_weights(cfg, model_cfg.decoder),
        no_object_weight=cfg.no_object_weight, num_points=cfg.num_points,
        importance_sample_ratio=cfg.importance_sample_ratio, oversample_ratio=cfg.oversample_ratio,
        stage_assignment=cfg.stage_assignment,
    ).to(device)
    loader = finetune_loader(
        train_set, cfg.data.batch_size, seed=cfg.data.seed, augment_config=cfg.data.augment(),
        category_map=category_ids, **cfg.data.worker_options(device),
    )

    def loss_fn(module, batch, step):
        return criterion(module(batch["images"]), batch["targets"])

    if val_set is not None:  # one loader (and its persistent workers) for every validation
        batches = eval_loader(val_set, cfg.data.batch_size, resize=cfg.data.eval_resize(),
                              category_map=category_ids, **cfg.data.worker_options(device))

    def validate(module: QEISModel, step: int) -> dict:
        # every rank predicts its slice of the val set; rank 0 scores the gathered results
        metrics, _ = evaluate_model(module, batches.make_batches(0), val_set.coco,
                                    category_ids, device=device)
        if not metrics:  # not rank 0
            return {}
        return {k: v for k, v in flat_metrics(metrics, "val/").items()
                if isinstance(v, (int, float))}

    best = BestCheckpointer(PRIMARY_METRIC, name=BEST_NAME, extra=lambda: {
        "model_config": model_cfg.to_dict(), "category_ids": category_ids})

    console.print(
        f"finetune: {len(loader.source)} training images, {len(category_ids)} categories, "
        f"init {cfg.init}, model {cfg.model.preset}/{cfg.model.decoder}, loss weights ce "
        f"{criterion.weights['ce']:g} bce {criterion.weights['bce']:g} dice "
        f"{criterion.weights['dice']:g}, stage assignment {criterion.stage_assignment}, device {device}"
    )
    train_cfg = cfg.train.model_copy(update={"progress": cfg.train.progress and progress})
    try:
        result = train(
            model, loss_fn, loader.make_batches, train_cfg, cfg.out, resume=cfg.resume,
            label="finetune",
            evaluate=validate if val_set is not None else None,
            hooks=[best] if val_set is not None else [],
            extra_state={"stage": "finetune", "model_config": model_cfg.to_dict(),
                         "category_ids": category_ids, "stage_config": cfg.resolved()},
        )
    except NonFiniteLossError as err:
        # on_nan=stop: one line naming the run's metrics file, which lists the batch's image ids
        raise InputError(f"training stopped: {err}", Path(cfg.out) / "metrics.jsonl") from None
    summary = {
        "step": result.step,
        "checkpoint": str(result.checkpoint),
        "best_step": best.best_step,
        PRIMARY_METRIC: best.best_value,
        "init": init_report,
    }
    if info.rank == 0:
        write_run_record(
            cfg.out, stage="finetune", config=cfg.resolved(), config_hash=cfg.config_hash(),
            inputs={"train_data": str(cfg.train_data), "val_data": str(cfg.val_data),
                    "init": cfg.init},
            counts=summary, started_at=started,
        )
    return summary


def initialise_from(model: QEISModel, init: str, skip: list[str] | None = None,
                    allow_partial: bool = False) -> dict:
    """Load a pre-trained checkpoint's QEIS weights into ``model`` (class head skipped when the
    class count differs; tensors whose name contains a ``skip`` pattern keep their fresh
    initialisation); ``"none"`` keeps the random initialisation. Returns the load report.

    Strict: any other model tensor the checkpoint lacks or holds with another shape (another
    preset, depth or width) is an :class:`InputError` naming it, unless ``allow_partial``."""
    if init == "none":
        return {"init": "none"}
    path = Path(init)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise InputError("no checkpoints/latest in this pretrain run folder", path)
        path = found
    if not path.is_file():
        raise InputError("--init: checkpoint not found (give a file, a run folder or none)", path)
    payload = load_training_checkpoint(path)
    state = payload["model"]
    prefix = "model."  # a PromptedModel's QEIS weights; its prompt encoder is not needed here
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    skipped_by_name = sorted(k for k in state if any(p in k for p in skip or []))
    state = {k: v for k, v in state.items() if k not in skipped_by_name}
    report = load_model_state(model, state, skip_mismatched=True)
    report.missing = [k for k in report.missing if k not in skipped_by_name]
    misfit = report.misfit(allowed=model.class_head_keys())
    if misfit and not allow_partial:
        raise InputError(f"--init: checkpoint does not fit the model: {misfit}; was it trained "
                         f"with the same model preset? (allow_partial_init loads only what "
                         f"fits)", path)
    console.print(f"init from {path}: {report.summary().splitlines()[0]}"
                  + (f" (partial: {misfit})" if misfit else ""), highlight=False)
    return {"init": str(path), "loaded": len(report.loaded), "skipped": list(report.skipped),
            "reinitialised": skipped_by_name}

