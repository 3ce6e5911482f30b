"""The training loop shared by ``pretrain``, ``finetune`` and ``backbone``: AdamW (or SGD with
momentum), warmup + cosine/step LR, gradient accumulation and clipping, AMP on CUDA, non-finite
loss guard, periodic evaluation, checkpoints with exact resume, and DistributedDataParallel
under torchrun.

    result = train(model, loss_fn, make_batches, TrainConfig(max_steps=1000), "runs/pretrain",
                   resume=True, evaluate=None, extra_state={"model_config": cfg.to_dict()})

- ``model``: an ``nn.Module`` already on its device holding every trainable parameter
  (wrap model and criterion in one module if the criterion has parameters).
- ``loss_fn(model, batch, step) -> dict[str, Tensor]``: scalar loss terms, ``"loss"`` being the
  one to minimise (mean over the rank's samples). ``model`` is the DDP-wrapped module under
  torch.distributed, so call it, not ``model.module``; ``step`` is the number of optimizer
  steps done.
- ``make_batches(epoch, start_batch) -> Iterator[batch]`` (docs/training.md): output depends
  only on (dataset, config, seed, epoch, rank, world size); under DDP each rank yields its
  slice of the global batch. A batch is a dict of tensors / lists / dicts of tensors (moved to
  the model's device here); its ``"image_ids"`` are logged when its loss is not finite.

Steps are optimizer steps; one step consumes ``accumulation_steps`` consecutive batches of the
stream (epochs follow each other; a group may span an epoch boundary). Everything about files
and formats is in ``docs/training.md``.

Test hook (docs/reliability.md): the environment variable ``UPLVP_TRAIN_FAULT`` injects faults
at deterministic points so that tests can prove the crash and NaN guarantees; unset, it does
nothing (see :class:`TrainFaults`).
"""
from __future__ import annotations

import bisect
import io
import math
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import InputError
from stages.run_logging import RunLogger
from stages.train_checkpoint import (
    LATEST_FILE,
    TRAINING_KEYS,
    LoopPosition,
    checkpoint_dir,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    restore_training_state,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)

LossFn = Callable[[nn.Module, Any, int], dict[str, Tensor]]
MakeBatches = Callable[[int, int], Iterator[Any]]
Evaluate = Callable[[nn.Module, int], dict[str, Any]]

# Fields that may change between an interrupted run and its resume without a warning.
_RESUME_FREE_FIELDS = frozenset({
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


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the torch.distributed group (0 of 1 when not initialised)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def distributed_info() -> DistInfo:
    """Rank, world size and local rank (``LOCAL_RANK``) of the initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Pick this process's device and, under torchrun (``WORLD_SIZE`` > 1), join the process
    group: nccl on CUDA, gloo on CPU. ``device``: "auto" (CUDA if available), "cuda" or "cpu".
    Returns the group info and the device (``cuda:LOCAL_RANK`` on GPU)."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    chosen = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return distributed_info(), chosen


FAULT_ENV = "UPLVP_TRAIN_FAULT"
_HANG_SECONDS = 300.0


@dataclass(frozen=True)
class TrainFaults:
    """Faults injected by the test hook ``UPLVP_TRAIN_FAULT="key=N[,key=N...]"`` (all optional):

    - ``nan-loss=G``: the loss of the G-th batch group this process trains (1-based, counting
      skipped groups) is multiplied by NaN, as a corrupt batch would make it.
    - ``hang-after-step=S``: after step S (and its metrics and checkpoint) the process sleeps
      up to 300 s, so that a test can SIGKILL it in that known state.
    - ``kill-in-save=S``: the checkpoint of step S dies mid-write: the first half of its bytes
      go to the temporary file ``checkpoints/.tmp-step-XXXXXXX.pt.*`` (the name the real writer
      uses), then the process SIGKILLs itself.
    """

    nan_loss_group: int | None = None
    hang_after_step: int | None = None
    kill_in_save_step: int | None = None

    @classmethod
    def from_env(cls) -> TrainFaults:
        """Parse ``$UPLVP_TRAIN_FAULT``; unset or empty: no faults. ``ValueError`` on a bad
        value (an unnoticed typo would make a fault test pass vacuously)."""
        raw = os.environ.get(FAULT_ENV, "").strip()
        keys = {"nan-loss": "nan_loss_group", "hang-after-step": "hang_after_step",
                "kill-in-save": "kill_in_save_step"}
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in raw.split(","))):
            key, _, value = item.partition("=")
            if key not in keys or not value.strip().isdigit():
                raise ValueError(f"{FAULT_ENV}: cannot parse {item!r} (expected one of "
                                 f"{', '.join(k + '=N' for k in keys)})")
            values[keys[key]] = int(value)
        return cls(**values)


def kill_mid_checkpoint_write(path: Path, model: nn.Module) -> None:
    """Test hook: write half of a serialized state dict to the temporary name the checkpoint
    writer uses for ``path``, then SIGKILL this process (as a crash mid-``torch.save``)."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict()}, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, _ = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (``on_nan="stop"`` or too many skips)."""


@dataclass
class TrainResult:
    """What a ``train`` call did.

    step / epoch / batch_in_epoch: the final loop position. checkpoint: the newest checkpoint
    on disk (None if none). step_losses: this process's total loss of each step it ran, by
    step number (1-based: the loss that produced step k's update is ``step_losses[k]``).
    nonfinite: the ``"nonfinite"`` records (docs/training.md). last_eval: the latest
    evaluation's values (rank 0), else None.
    """

    step: int
    epoch: int
    batch_in_epoch: int
    checkpoint: Path | None = None
    step_losses: dict[int, float] = field(default_factory=dict)
    nonfinite: list[dict[str, Any]] = field(default_factory=list)
    last_eval: dict[str, Any] | None = None


def batch_stream(
    make_batches: MakeBatches, epoch: int, start_batch: int, batches_per_epoch: int | None
) -> Iterator[tuple[int, int, Any]]:
    """Endless ``(epoch, batch index, batch)`` from ``make_batches(epoch, start_batch)``, then
    ``make_batches(epoch + 1, 0)``, ...; each epoch cut after ``batches_per_epoch`` batches.
    Raises ``ValueError`` if an epoch started at batch 0 yields nothing."""
    while True:
        index = start_batch
        if batches_per_epoch is None or start_batch < batches_per_epoch:
            iterator = iter(make_batches(epoch, start_batch))
            try:
                for batch in iterator:
                    yield epoch, index, batch
                    index += 1
                    if batches_per_epoch is not None and index >= batches_per_epoch:
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        if index == 0:
            raise ValueError(f"make_batches({epoch}, 0) yielded no batches")
        epoch, start_batch = epoch + 1, 0


def move_to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside dicts / lists / tuples moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: move_to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_to_device(v, device) for v in value)
    return value


def is_backbone_parameter(name: str) -> bool:
    """A parameter under a module named ``backbone`` (at any depth, e.g.
    ``model.backbone.body...`` of a prompted model), except one under that module's ``fpn``
    (torchvision's ``BackboneWithFPN.fpn`` of the Mask R-CNN peer: a neck, trained as a head,
    as our pixel decoder is)."""
    parts = name.split(".")
    return "backbone" in parts and "fpn" not in parts[parts.index("backbone") + 1:]


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimizer parameter groups of ``model``'s trainable parameters: the backbone's
    (:func:`is_backbone_parameter`) at ``lr * backbone_lr_multiplier``, the rest at ``lr``; one
    group when the multiplier is 1."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.backbone_lr_multiplier == 1.0:
        return [{"params": [p for _, p in named]}]
    backbone = [p for n, p in named if is_backbone_parameter(n)]
    rest = [p for n, p in named if not is_backbone_parameter(n)]
    return [group for group in ({"params": rest},
                                {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_multiplier})
            if group["params"]]


def train(
    model: nn.Module,
    loss_fn: LossFn,
    make_batches: MakeBatches,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    evaluate: Evaluate | None = None,
    extra_state: dict[str, Any] | None = None,
    label: str = "train",
) -> TrainResult:
    """Train ``model`` to ``cfg.max_steps`` optimizer steps, writing into ``out_dir``.

    ``resume=True`` continues from ``checkpoints/latest`` (model, optimizer, scheduler, scaler,
    RNG, data position), or starts from scratch if there is none; ``resume=False`` on a
    directory that already holds checkpoints raises ``InputError``. ``evaluate(model, step)``
    runs on every rank (unwrapped model, eval mode, no grad; each rank evaluates its share and
    rank 0 returns the values) every ``eval_every`` steps and after the last step; rank 0's
    values go to the metrics. ``extra_state`` (plain values) is stored in
    every checkpoint. ``label`` names the run in its plain progress lines (the stage). Raises
    ``NonFiniteLossError`` when stopping on a non-finite loss.
    """
    return _Run(model, loss_fn, make_batches, cfg, Path(out_dir), evaluate, extra_state or {},
                resume, label).run()


@dataclass
class _Window:
    """Sums over the optimizer steps since the last metrics line."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    data_wait: float = 0.0
    grad_norm: float = 0.0


@dataclass
class _GroupOutcome:
    """One accumulation group: its mean loss terms, or why it was not applied."""

    terms: dict[str, Tensor]
    epoch: int
    batch: int
    image_ids: list[int]
    grad_norm: float | None = None
    lr: float = 0.0
    nonfinite: str | None = None  # "loss" | "grad"


class _Run:
    """State of one ``train`` call; ``run()`` is the loop."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, make_batches: MakeBatches,
                 cfg: TrainConfig, out_dir: Path, evaluate: Evaluate | None,
                 extra_state: dict[str, Any], resume: bool, label: str = "train") -> None:
        self.model, self.loss_fn, self.make_batches = model, loss_fn, make_batches
        self.cfg, self.out_dir, self.evaluate, self.extra_state = cfg, out_dir, evaluate, extra_state
        self.info = distributed_info()
        clash = sorted(set(extra_state) & set(TRAINING_KEYS))
        if clash:  # checked up front, not at the first checkpoint
            raise ValueError(f"extra_state uses reserved checkpoint key(s): {', '.join(clash)}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("train: the model has no trainable parameters")
        self.device = self.params[0].device
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr,
                                             momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr,
                                               weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.amp_dtype = None
        if cfg.amp != "off" and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        notes: list[str] = []
        if cfg.amp != "off" and self.amp_dtype is None:
            notes.append(f"amp={cfg.amp} needs CUDA; training in float32 on {self.device}")
        self.position = self._start(resume, notes)
        self.wrapped: nn.Module = model
        if dist.is_available() and dist.is_initialized():
            self.wrapped = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
        self.result = TrainResult(self.position.step, self.position.epoch,
                                  self.position.batch_in_epoch, latest_checkpoint(out_dir))
        self.consecutive_nonfinite = 0
        self.faults = TrainFaults.from_env()
        self.groups_run = 0
        self.logger = RunLogger(
            out_dir, enabled=self.info.rank == 0, total_steps=cfg.max_steps,
            start_step=self.position.step, progress=cfg.progress, tensorboard=cfg.tensorboard,
            label=label)
        for note in notes if self.info.rank == 0 else []:
            self.logger.message(note)
        self.started = time.perf_counter()

    def _start(self, resume: bool, notes: list[str]) -> LoopPosition:
        """Restore the latest checkpoint (resume) or seed the RNGs (fresh run)."""
        existing = list_checkpoints(checkpoint_dir(self.out_dir))
        if not resume and existing:
            raise InputError("already holds checkpoints: resume that run (--resume) or choose "
                             "a new output directory", checkpoint_dir(self.out_dir))
        path = latest_checkpoint(self.out_dir) if resume else None
        if resume and path is None and existing:
            # Killed between the first checkpoint's rename and the first 'latest' write: every
            # step-*.pt under its final name is complete (atomic rename), so take the newest.
            path = existing[-1]
            notes.append(f"no '{LATEST_FILE}' file: resuming from the newest checkpoint {path.name}")
        if path is None:
            if resume:
                notes.append(f"no checkpoint in {checkpoint_dir(self.out_dir)}: starting from scratch")
            seed_all(self.cfg.seed + self.info.rank)
            return LoopPosition(0, 0, 0)
        payload = load_training_checkpoint(path)
        position = restore_training_state(payload, model=self.model, optimizer=self.optimizer,
                                          scheduler=self.scheduler, scaler=self.scaler)
        steps = _gather(position.step)
        if len(set(steps)) != 1:
            raise RuntimeError(f"ranks resumed from different steps {steps}: the output "
                               "directory must be on a filesystem every rank shares")
        states = payload["rng"]
        if len(states) != self.info.world_size:
            notes.append(f"checkpoint has RNG states of {len(states)} rank(s), this run has "
                         f"{self.info.world_size}: every rank takes rank 0's")
        set_rng_state(states[self.info.rank] if len(states) == self.info.world_size else states[0])
        # a field the stored config lacks was added later: such runs had its default
        stored = {**TrainConfig.model_fields_defaults(), **payload["config"]}
        changed = sorted(k for k, v in self.cfg.model_dump(mode="json").items()
                         if k not in _RESUME_FREE_FIELDS and stored.get(k) != v)
        if changed:
            notes.append(f"resumed with changed settings {', '.join(changed)}: the run will not "
                         "match an uninterrupted one")
        notes.append(f"resumed from {path} (step {position.step}, epoch {position.epoch}, "
                     f"batch {position.batch_in_epoch})")
        return position

    def run(self) -> TrainResult:
        cfg = self.cfg
        stream = batch_stream(self.make_batches, self.position.epoch,
                              self.position.batch_in_epoch, cfg.batches_per_epoch)
        self.model.train()
        window = _Window()
        try:
            while self.position.step < cfg.max_steps:
                outcome = self._train_group(stream, window)
                if outcome.nonfinite is not None:
                    self._on_nonfinite(outcome)
                    continue
                self.consecutive_nonfinite = 0
                step = self.position.step
                self.result.step_losses[step] = float(outcome.terms["loss"])
                self.logger.advance(step, self.result.step_losses[step],
                                    window.steps / window.seconds if window.seconds > 0 else None)
                last = step == cfg.max_steps
                if step % cfg.log_every == 0 or last:
                    self._log_window(window, outcome)
                    window = _Window()
                if self.evaluate is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                    self._evaluate()
                if step % cfg.checkpoint_every == 0 or last:
                    self._checkpoint()
                if step == self.faults.hang_after_step:
                    time.sleep(_HANG_SECONDS)
        finally:
            self.logger.close()
        _barrier()
        self.result.step, self.result.epoch = self.position.step, self.position.epoch
        self.result.batch_in_epoch = self.position.batch_in_epoch
        return self.result

    def _train_group(self, stream: Iterator[tuple[int, int, Any]], window: _Window) -> _GroupOutcome:
        """Forward/backward ``accumulation_steps`` batches, then one optimizer step unless a
        loss (on any rank) or the gradient norm is not finite."""
        accumulation = self.cfg.accumulation_steps
        started = time.perf_counter()
        sums: dict[str, Tensor] = {}
        image_ids: list[int] = []
        self.groups_run += 1
        inject_nan = self.groups_run == self.faults.nan_loss_group
        for micro in range(accumulation):
            wait_start = time.perf_counter()
            epoch, index, batch = next(stream)
            batch = move_to_device(batch, self.device)
            window.data_wait += time.perf_counter() - wait_start
            image_ids.extend(int(i) for i in (batch.get("image_ids", []) if isinstance(batch, dict) else []))
            no_sync = isinstance(self.wrapped, DistributedDataParallel) and micro < accumulation - 1
            with self.wrapped.no_sync() if no_sync else nullcontext():
                with self._autocast():
                    terms = self.loss_fn(self.wrapped, batch, self.position.step)
                if not isinstance(terms, dict) or not isinstance(terms.get("loss"), Tensor):
                    raise ValueError("loss_fn must return a dict of tensors with a 'loss' entry")
                if inject_nan:
                    terms = {**terms, "loss": terms["loss"] * float("nan")}
                self.scaler.scale(terms["loss"] / accumulation).backward()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
        means = {key: value / accumulation for key, value in sums.items()}
        outcome = _GroupOutcome(means, epoch, index, image_ids)
        bad = (~torch.isfinite(means["loss"])).float()
        if _all_reduce(bad, dist.ReduceOp.MAX).item() > 0:
            outcome.nonfinite = "loss"
        else:
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or math.inf)
            outcome.grad_norm = float(norm)
            # With fp16 the GradScaler owns inf/NaN gradients: it skips the step and rescales.
            if not math.isfinite(outcome.grad_norm) and not self.scaler.is_enabled():
                outcome.nonfinite = "grad"
        if outcome.nonfinite is not None:
            self.optimizer.zero_grad(set_to_none=True)
            window.seconds += time.perf_counter() - started
            return outcome
        outcome.lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.position = LoopPosition(self.position.step + 1, *self._next_batch(epoch, index))
        for key, value in means.items():
            window.sums[key] = window.sums.get(key, 0.0) + value
        window.steps += 1
        window.grad_norm += outcome.grad_norm
        window.seconds += time.perf_counter() - started
        return outcome

    def _next_batch(self, epoch: int, index: int) -> tuple[int, int]:
        """(epoch, batch index) of the batch that follows batch ``index`` of ``epoch``."""
        if self.cfg.batches_per_epoch is not None and index + 1 >= self.cfg.batches_per_epoch:
            return epoch + 1, 0
        return epoch, index + 1

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _log_window(self, window: _Window, outcome: _GroupOutcome) -> None:
        """One ``"train"`` metrics line: window means of the loss terms averaged over ranks."""
        keys = sorted(window.sums)
        values = torch.stack([window.sums[k] for k in keys]) / window.steps
        values = (_all_reduce(values, dist.ReduceOp.SUM) / self.info.world_size).tolist()
        record: dict[str, Any] = {
            "kind": "train", "step": self.position.step, "epoch": outcome.epoch, "lr": outcome.lr,
            **dict(zip(keys, values)),
            "grad_norm": window.grad_norm / window.steps,
            "step_seconds": window.seconds / window.steps,
            "data_wait_share": window.data_wait / window.seconds if window.seconds > 0 else 0.0,
            "seconds": time.perf_counter() - self.started,
        }
        if self.device.type == "cuda":
            record["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.logger.log(record)

    def _evaluate(self) -> None:
        # every rank runs it (distributed evaluation: each its slice, rank 0 scores); only
        # rank 0's values are kept and logged
        self.model.eval()
        with torch.no_grad():
            values = self.evaluate(self.model, self.position.step)
        self.model.train()
        if self.info.rank == 0:
            self.result.last_eval = values
            self.logger.log({"kind": "eval", "step": self.position.step, **values})
        _barrier()

    def _checkpoint(self) -> None:
        states = _gather(rng_state())
        self.result.checkpoint = checkpoint_dir(self.out_dir) / checkpoint_name(self.position.step)
        if self.info.rank == 0:
            if self.position.step == self.faults.kill_in_save_step:
                kill_mid_checkpoint_write(self.result.checkpoint, self.model)
            save_training_checkpoint(
                self.out_dir, model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, scaler=self.scaler, position=self.position,
                rng=states, config=self.cfg.model_dump(mode="json"), extra=self.extra_state,
                keep_last=self.cfg.keep_last)

    def _on_nonfinite(self, outcome: _GroupOutcome) -> None:
        """Log the skipped group with every rank's image ids; raise when stopping."""
        self.consecutive_nonfinite += 1
        stop = self.cfg.on_nan == "stop" or self.consecutive_nonfinite >= self.cfg.max_consecutive_nan
        image_ids = [i for ids in _gather(outcome.image_ids) for i in ids]
        record = {"kind": "nonfinite", "step": self.position.step, "epoch": outcome.epoch,
                  "batch": outcome.batch, "reason": outcome.nonfinite, "image_ids": image_ids,
                  "action": "stop" if stop else "skip"}
        self.result.nonfinite.append(record)
        self.logger.log(record)
        # The group's batches are consumed: the next group reads the batches after them.
        self.position = LoopPosition(self.position.step, *self._next_batch(outcome.epoch, outcome.batch))
        message = (f"non-finite {outcome.nonfinite} after step {record['step']} (epoch "
                   f"{outcome.epoch}, batch {outcome.batch}, images {image_ids})")
        if self.info.rank == 0:
            self.logger.message(f"{message}: {record['action']}")
        if stop:
            reason = ("on_nan=stop" if self.cfg.on_nan == "stop"
                      else f"{self.consecutive_nonfinite} groups in a row")
            raise NonFiniteLossError(f"{message}; stopped ({reason})")


def seed_all(seed: int) -> None:
    """Seed ``random``, ``numpy`` (legacy global) and ``torch`` (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce(tensor: Tensor, op: dist.ReduceOp) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def _gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, by rank (``[obj]`` without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
