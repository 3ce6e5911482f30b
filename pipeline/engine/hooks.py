"""Hooks: what the training loop does around its steps, one object per concern.

The loop (:class:`pipeline.engine.loop.Trainer`) only trains; everything else happens in hooks
called in list order, in the manner of detectron2's ``HookBase``:

- ``before_train(trainer)``: once, after the run is set up (a resume restored);
- ``after_step(trainer)``: after every applied optimizer step (``trainer.step`` is the number of
  steps done, ``trainer.is_last_step`` tells the last);
- ``after_eval(trainer, values)``: after each evaluation, with rank 0's values (``{}`` on the
  other ranks);
- ``after_train(trainer)``: once, when the loop ends, also when it raised.

:func:`default_hooks` is the list ``train`` uses: metrics lines, evaluation, the best
checkpoint (when asked for), the test-only fault hooks (``UPLVP_TRAIN_FAULT``), and the
periodic checkpoint, in an order that writes a step's metrics, then evaluates it, then saves
it. A new hook subclasses :class:`HookBase` and is passed to ``train(..., hooks=[...])``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.engine.checkpoint import checkpoint_dir
from uplvp_model.checkpoint import read_checkpoint, save_model_state

if TYPE_CHECKING:  # the loop imports this module; only annotations need the loop
    from pipeline.engine.loop import Trainer

Evaluate = Callable[[torch.nn.Module, int], dict[str, Any]]


class HookBase:
    """A hook: override any of the four methods (each does nothing here)."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_eval(self, trainer: Trainer, values: dict[str, Any]) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


class MetricsWriter(HookBase):
    """A ``"train"`` line in ``metrics.jsonl`` / TensorBoard / the progress log every
    ``log_every`` steps and after the last: the window means since the previous line."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step % self.log_every == 0 or trainer.is_last_step:
            trainer.log_window()


class EvalHook(HookBase):
    """Run ``evaluate(model, step)`` on every rank every ``eval_every`` steps (0: only after
    the last) and after the last step; the values go to the metrics and to every hook's
    ``after_eval``."""

    def __init__(self, evaluate: Evaluate, eval_every: int) -> None:
        self.evaluate, self.eval_every = evaluate, eval_every

    def after_step(self, trainer: Trainer) -> None:
        if trainer.is_last_step or (self.eval_every and trainer.step % self.eval_every == 0):
            trainer.run_evaluation(self.evaluate)


class PeriodicCheckpointer(HookBase):
    """A training checkpoint (model, optimizer, RNG, data position) every ``every`` steps and
    after the last (``docs/training.md``)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def is_due(self, trainer: Trainer) -> bool:
        return trainer.step % self.every == 0 or trainer.is_last_step

    def after_step(self, trainer: Trainer) -> None:
        if self.is_due(trainer):
            trainer.save_checkpoint()


class BestCheckpointer(HookBase):
    """``checkpoints/<name>``: the model state at the evaluation with the highest ``metric`` so
    far, with ``extra()`` and ``{"step", metric}`` stored beside it (rank 0 only).

    On a resumed run the best so far is read back from that file, so an interrupted run keeps
    the best of its whole history, as an uninterrupted one does (a value it cannot read counts
    as no best yet). ``best_step`` / ``best_value``: the best so far (``None`` before any)."""

    def __init__(self, metric: str, extra: Callable[[], dict[str, Any]],
                 name: str = "best.pt") -> None:
        self.metric, self.extra, self.name = metric, extra, name
        self.best_step: int | None = None
        self.best_value: float | None = None

    def path(self, trainer: Trainer) -> Path:
        return checkpoint_dir(trainer.out_dir) / self.name

    def before_train(self, trainer: Trainer) -> None:
        path = self.path(trainer)
        if trainer.start_step == 0 or not path.is_file():
            return
        try:
            payload = read_checkpoint(path)
        except ValueError:
            return
        step, value = payload.get("step"), payload.get(self.metric)
        if isinstance(step, int) and step <= trainer.start_step and isinstance(value, float):
            self.best_step, self.best_value = step, value

    def after_eval(self, trainer: Trainer, values: dict[str, Any]) -> None:
        if not values:  # not rank 0
            return
        value = float(values.get(self.metric) or 0.0)
        if self.best_value is None or value > self.best_value:
            self.best_step, self.best_value = trainer.step, value
            save_model_state(self.path(trainer), trainer.model,
                             {**self.extra(), "step": trainer.step, self.metric: value})
