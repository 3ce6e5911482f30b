"""The training loop shared by ``pretrain``, ``finetune`` and ``backbone``: AdamW (or SGD with
momentum), warmup + cosine/step LR, gradient accumulation and clipping, AMP on CUDA, non-finite
loss guard, and DistributedDataParallel under torchrun; metrics, evaluation and checkpoints
are hooks (``pipeline/engine/hooks.py``).

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
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.engine.checkpoint import (
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
from pipeline.engine.config import RESUME_FREE_FIELDS, TrainConfig, lr_factor
from pipeline.engine.distributed import all_reduce, barrier, distributed_info, gather, seed_all
from pipeline.engine.faults import TrainFaults, fault_hooks
from pipeline.engine.hooks import Evaluate, EvalHook, HookBase, MetricsWriter, PeriodicCheckpointer
from pipeline.engine.metrics import RunLogger
from pipeline.errors import InputError

LossFn = Callable[[nn.Module, Any, int], dict[str, Tensor]]
MakeBatches = Callable[[int, int], Iterator[Any]]

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
    hooks: Sequence[HookBase] = (),
) -> TrainResult:
    """Train ``model`` to ``cfg.max_steps`` optimizer steps, writing into ``out_dir``.

    ``resume=True`` continues from ``checkpoints/latest`` (model, optimizer, scheduler, scaler,
    RNG, data position), or starts from scratch if there is none; ``resume=False`` on a
    directory that already holds checkpoints raises ``InputError``. ``evaluate(model, step)``
    runs on every rank (unwrapped model, eval mode, no grad; each rank evaluates its share and
    rank 0 returns the values) every ``eval_every`` steps and after the last step; rank 0's
    values go to the metrics. ``extra_state`` (plain values) is stored in
    every checkpoint. ``label`` names the run in its plain progress lines (the stage).
    ``hooks`` run after the evaluation and before the checkpoint of each step (e.g. a
    :class:`~pipeline.engine.hooks.BestCheckpointer`). Raises ``NonFiniteLossError`` when
    stopping on a non-finite loss.
    """
    trainer = Trainer(model, loss_fn, make_batches, cfg, Path(out_dir), extra_state or {},
                      resume, label)
    trainer.hooks = default_hooks(cfg, evaluate, hooks, TrainFaults.from_env())
    return trainer.run()


def default_hooks(cfg: TrainConfig, evaluate: Evaluate | None, extra: Sequence[HookBase],
                  faults: TrainFaults) -> list[HookBase]:
    """The hooks of :func:`train`, in order: metrics line, evaluation, the caller's hooks,
    fault hooks (tests only), periodic checkpoint, fault hooks that act after it."""
    checkpointer = PeriodicCheckpointer(cfg.checkpoint_every)
    before, after = fault_hooks(faults, checkpointer)
    return [MetricsWriter(cfg.log_every),
            *([EvalHook(evaluate, cfg.eval_every)] if evaluate is not None else []),
            *extra, *before, checkpointer, *after]


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


class Trainer:
    """One training run: set up (optimizer, scheduler, resume), then ``run()`` the loop,
    calling ``hooks`` (``pipeline/engine/hooks.py``) around the steps.

    What hooks read: ``model`` (unwrapped), ``cfg``, ``out_dir``, ``rank``, ``step`` (optimizer
    steps done), ``start_step`` (where this process started: 0, or the resumed step),
    ``is_last_step``, ``result``, ``logger``; what they call: ``log_window()``,
    ``run_evaluation(evaluate)``, ``save_checkpoint()``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, make_batches: MakeBatches,
                 cfg: TrainConfig, out_dir: Path, extra_state: dict[str, Any], resume: bool,
                 label: str = "train", hooks: Sequence[HookBase] = ()) -> None:
        self.model, self.loss_fn, self.make_batches = model, loss_fn, make_batches
        self.cfg, self.out_dir, self.extra_state = cfg, out_dir, extra_state
        self.hooks: list[HookBase] = list(hooks)
        self.info = distributed_info()
        clash = sorted(set(extra_state) & set(TRAINING_KEYS))
        if clash:  # checked up front, not at the first checkpoint
            raise ValueError(f"extra_state uses reserved checkpoint key(s): {', '.join(clash)}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("train: the model has no trainable parameters")
        self.device = self.params[0].device
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.amp_dtype = None
        if cfg.amp != "off" and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        notes: list[str] = []
        if cfg.amp != "off" and self.amp_dtype is None:
            notes.append(f"amp={cfg.amp} needs CUDA; training in float32 on {self.device}")
        self.position = self._start(resume, notes)
        self.start_step = self.position.step
        self.wrapped: nn.Module = model
        if dist.is_available() and dist.is_initialized():
            self.wrapped = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
        self.result = TrainResult(self.position.step, self.position.epoch,
                                  self.position.batch_in_epoch, latest_checkpoint(out_dir))
        self.consecutive_nonfinite = 0
        self.window = _Window()
        self.last_outcome: _GroupOutcome | None = None
        self.logger = RunLogger(
            out_dir, enabled=self.info.rank == 0, total_steps=cfg.max_steps,
            start_step=self.position.step, progress=cfg.progress, tensorboard=cfg.tensorboard,
            label=label)
        for note in notes if self.info.rank == 0 else []:
            self.logger.message(note)
        self.started = time.perf_counter()

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def step(self) -> int:
        return self.position.step

    @property
    def is_last_step(self) -> bool:
        return self.position.step == self.cfg.max_steps

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
        steps = gather(position.step)
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
                         if k not in RESUME_FREE_FIELDS and stored.get(k) != v)
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
        try:
            for hook in self.hooks:
                hook.before_train(self)
            while self.position.step < cfg.max_steps:
                outcome = self._train_group(stream, self.window)
                if outcome.nonfinite is not None:
                    self._on_nonfinite(outcome)
                    continue
                self.consecutive_nonfinite = 0
                self.last_outcome = outcome
                step = self.position.step
                self.result.step_losses[step] = float(outcome.terms["loss"])
                self.logger.advance(step, self.result.step_losses[step],
                                    self.window.steps / self.window.seconds
                                    if self.window.seconds > 0 else None)
                for hook in self.hooks:
                    hook.after_step(self)
        finally:
            for hook in self.hooks:
                hook.after_train(self)
            self.logger.close()
        barrier()
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
                self.scaler.scale(terms["loss"] / accumulation).backward()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
        means = {key: value / accumulation for key, value in sums.items()}
        outcome = _GroupOutcome(means, epoch, index, image_ids)
        bad = (~torch.isfinite(means["loss"])).float()
        if all_reduce(bad, dist.ReduceOp.MAX).item() > 0:
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

    def log_window(self) -> None:
        """One ``"train"`` metrics line: the window's means of the loss terms averaged over
        ranks; the window starts again."""
        window, outcome = self.window, self.last_outcome
        keys = sorted(window.sums)
        values = torch.stack([window.sums[k] for k in keys]) / window.steps
        values = (all_reduce(values, dist.ReduceOp.SUM) / self.info.world_size).tolist()
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
        self.window = _Window()

    def run_evaluation(self, evaluate: Evaluate) -> dict[str, Any]:
        """``evaluate`` on every rank (distributed evaluation: each its slice, rank 0 scores);
        rank 0's values are kept, logged and passed to every hook's ``after_eval``."""
        self.model.eval()
        with torch.no_grad():
            values = evaluate(self.model, self.position.step)
        self.model.train()
        values = values if self.info.rank == 0 else {}
        if self.info.rank == 0:
            self.result.last_eval = values
            self.logger.log({"kind": "eval", "step": self.position.step, **values})
        for hook in self.hooks:
            hook.after_eval(self, values)
        barrier()
        return values

    def save_checkpoint(self) -> None:
        """A training checkpoint of this step (rank 0 writes; every rank's RNG state in it)."""
        states = gather(rng_state())
        self.result.checkpoint = checkpoint_dir(self.out_dir) / checkpoint_name(self.position.step)
        if self.info.rank == 0:
            save_training_checkpoint(
                self.out_dir, model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, scaler=self.scaler, position=self.position,
                rng=states, config=self.cfg.model_dump(mode="json"), extra=self.extra_state,
                keep_last=self.cfg.keep_last)

    def _on_nonfinite(self, outcome: _GroupOutcome) -> None:
        """Log the skipped group with every rank's image ids; raise when stopping."""
        self.consecutive_nonfinite += 1
        stop = self.cfg.on_nan == "stop" or self.consecutive_nonfinite >= self.cfg.max_consecutive_nan
        image_ids = [i for ids in gather(outcome.image_ids) for i in ids]
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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum, over :func:`param_groups`."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
