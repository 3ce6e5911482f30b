"""``TrainConfig``: the training loop's settings, and its learning-rate schedule."""
from __future__ import annotations

import bisect
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Fields that may change between an interrupted run and its resume without a warning.
RESUME_FREE_FIELDS = frozenset({
    "checkpoint_every", "keep_last", "log_every", "eval_every", "on_nan", "max_consecutive_nan",
    "progress", "tensorboard",
})


class TrainConfig(BaseModel):
    """Training-loop settings (all step counts are optimizer steps)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_steps: int = Field(gt=0, description="optimizer steps to train in total")
    batches_per_epoch: int | None = Field(
        None, gt=0, description="cut each epoch after this many batches; None: an epoch ends "
        "when make_batches' iterator ends")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw, or sgd with momentum (the self-supervised backbone stage)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.05, ge=0, description="weight decay (all parameters)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd's momentum (adamw: unused)")
    backbone_lr_multiplier: float = Field(
        1.0, gt=0, description="learning rate of the parameters under a 'backbone' module, "
        "relative to lr (Mask2Former trains its ImageNet backbone at 0.1)")
    grad_clip: float | None = Field(
        1.0, gt=0, description="clip the global gradient L2 norm to this; None: no clipping")
    warmup_steps: int = Field(0, ge=0, description="linear warmup length")
    warmup_factor: float = Field(0.001, gt=0, le=1, description="LR factor at step 0 of warmup")
    schedule: Literal["cosine", "step"] = Field(
        "cosine", description="cosine: half cosine from 1 to 0 over max_steps; step: times gamma "
        "at each of lr_steps")
    lr_steps: list[int] = Field(default_factory=list, description="steps where 'step' decays")
    gamma: float = Field(0.1, gt=0, description="'step' schedule decay factor")
    accumulation_steps: int = Field(1, ge=1, description="batches per optimizer step")
    amp: Literal["off", "bf16", "fp16"] = Field(
        "off", description="autocast dtype on CUDA (fp16 adds a GradScaler); ignored on CPU")
    checkpoint_every: int = Field(1000, gt=0, description="save every N steps (and at the end)")
    keep_last: int = Field(3, ge=1, description="checkpoints kept on disk")
    log_every: int = Field(20, gt=0, description="metrics line every N steps (and at the end)")
    eval_every: int = Field(
        0, ge=0, description="evaluate every N steps and at the end; 0: at the end only")
    seed: int = Field(0, description="global RNG seed (rank r uses seed + r)")
    on_nan: Literal["skip", "stop"] = Field(
        "skip", description="non-finite loss or gradient: skip the batch group or stop")
    max_consecutive_nan: int = Field(
        10, ge=1, description="stop after this many skipped groups in a row")
    find_unused_parameters: bool = Field(False, description="DistributedDataParallel option")
    progress: bool = Field(
        True, description="rich progress bar on rank 0 where stderr is a terminal; elsewhere, "
        "or when False, one plain line per metrics line")
    tensorboard: bool = Field(True, description="write TensorBoard events on rank 0")

    @classmethod
    def model_fields_defaults(cls) -> dict[str, Any]:
        """The fields that have a default, with it (JSON values)."""
        return {name: field.default for name, field in cls.model_fields.items()
                if not field.is_required() and field.default_factory is None}

    @model_validator(mode="after")
    def _check_lr_steps(self) -> TrainConfig:
        if any(s <= 0 for s in self.lr_steps) or self.lr_steps != sorted(set(self.lr_steps)):
            raise ValueError(f"lr_steps must be positive and strictly increasing, got {self.lr_steps}")
        return self


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): warmup x schedule.

    warmup: ``warmup_factor + (1 - warmup_factor) * step / warmup_steps`` for step <
    ``warmup_steps``, else 1. cosine: ``0.5 * (1 + cos(pi * step / max_steps))``. step:
    ``gamma ** (number of lr_steps <= step)``.
    """
    warmup = 1.0
    if step < cfg.warmup_steps:
        warmup = cfg.warmup_factor + (1.0 - cfg.warmup_factor) * step / cfg.warmup_steps
    if cfg.schedule == "cosine":
        main = 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.max_steps) / cfg.max_steps))
    else:
        main = cfg.gamma ** bisect.bisect_right(cfg.lr_steps, step)
    return warmup * main
