"""Test-only faults for the training loop (docs/reliability.md), as hooks.

``UPLVP_TRAIN_FAULT="key=N[,key=N...]"`` makes a run fail at a deterministic point so that tests
can prove the crash and NaN guarantees; unset, :func:`fault_hooks` returns no hook and nothing
in the loop knows about faults.
"""
from __future__ import annotations

import io
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.engine.checkpoint import checkpoint_dir, checkpoint_name
from pipeline.engine.hooks import HookBase, PeriodicCheckpointer

if TYPE_CHECKING:
    from pipeline.engine.loop import Trainer

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


class NanLossFault(HookBase):
    """Multiplies the loss of every batch of the ``group``-th batch group this process trains
    (1-based, skipped groups counted) by NaN, as a corrupt batch would."""

    def __init__(self, group: int) -> None:
        self.group = group

    def before_train(self, trainer: Trainer) -> None:
        loss_fn, accumulation = trainer.loss_fn, trainer.cfg.accumulation_steps
        calls = 0

        def poisoned(model, batch, step):
            nonlocal calls
            calls += 1
            terms = loss_fn(model, batch, step)
            if (calls - 1) // accumulation + 1 == self.group and isinstance(terms, dict):
                terms = {**terms, "loss": terms["loss"] * float("nan")}
            return terms

        trainer.loss_fn = poisoned


class KillInCheckpointWrite(HookBase):
    """At step ``step``, when ``checkpointer`` is due, writes half a checkpoint under the
    writer's temporary name and SIGKILLs the process (rank 0). Placed before the checkpointer."""

    def __init__(self, step: int, checkpointer: PeriodicCheckpointer) -> None:
        self.step, self.checkpointer = step, checkpointer

    def after_step(self, trainer: Trainer) -> None:
        if (trainer.step == self.step and trainer.rank == 0
                and self.checkpointer.is_due(trainer)):
            path = checkpoint_dir(trainer.out_dir) / checkpoint_name(trainer.step)
            kill_mid_checkpoint_write(path, trainer.model)


class HangAfterStep(HookBase):
    """After step ``step`` (its metrics and checkpoint written: placed last) the process
    sleeps up to 300 s, so that a test can SIGKILL it in that known state."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step == self.step:
            time.sleep(_HANG_SECONDS)


def fault_hooks(faults: TrainFaults, checkpointer: PeriodicCheckpointer
                ) -> tuple[list[HookBase], list[HookBase]]:
    """(hooks to place before ``checkpointer``, hooks to place after it) for ``faults``."""
    before: list[HookBase] = []
    after: list[HookBase] = []
    if faults.nan_loss_group is not None:
        before.append(NanLossFault(faults.nan_loss_group))
    if faults.kill_in_save_step is not None:
        before.append(KillInCheckpointWrite(faults.kill_in_save_step, checkpointer))
    if faults.hang_after_step is not None:
        after.append(HangAfterStep(faults.hang_after_step))
    return before, after
