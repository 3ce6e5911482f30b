"""Training checkpoints: everything a run needs to continue exactly where it stopped.

Layout inside a run directory::

    checkpoints/step-0000100.pt   one file per saved optimizer step (zero-padded to 7 digits)
    checkpoints/latest            text file: the file name of the newest complete checkpoint

A checkpoint is a ``torch.save`` dict of tensors and plain Python values only (``torch.load(path,
weights_only=True)`` reads it), written by ``uplvp_model.checkpoint.save_model_state`` (temporary
file, fsync, ``os.replace``)::

    format_version            1 (model checkpoint format, uplvp_model.checkpoint)
    model                     state dict of the unwrapped model (no DDP "module." prefix)
    training_format_version   1 (the keys below)
    optimizer, scheduler, scaler   their state_dict()s (scaler: {} when AMP fp16 is off)
    step                      optimizer steps done
    epoch, batch_in_epoch     where the data stream continues: make_batches(epoch, batch_in_epoch)
    rng                       list, one RNG state per rank (see rng_state())
    config                    the resolved TrainConfig as a dict
    ... plus the caller's extra keys (e.g. model_config, category_ids)

``latest`` is rewritten (atomically) only after the checkpoint file is in place, so a run killed
at any moment leaves ``latest`` naming a complete checkpoint. Older checkpoints beyond the last
``keep_last`` are deleted after ``latest`` moves on.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.atomic import write_text_atomic
from pipeline.errors import InputError
from uplvp_model.checkpoint import read_checkpoint, save_model_state

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAINING_FORMAT_VERSION = 1
TRAINING_KEYS = (
    "training_format_version", "optimizer", "scheduler", "scaler", "step", "epoch",
    "batch_in_epoch", "rng", "config",
)
_NAME = re.compile(r"^step-(\d{7,})\.pt$")


@dataclass(frozen=True)
class LoopPosition:
    """Where a run stands: ``step`` optimizer steps done; the next batch to read is batch
    ``batch_in_epoch`` (0-based) of ``make_batches(epoch, ...)``."""

    step: int
    epoch: int
    batch_in_epoch: int


def checkpoint_name(step: int) -> str:
    """``step-0000100.pt`` for step 100."""
    return f"step-{step:07d}.pt"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only``-loadable).

    ``torch``: CPU generator state (uint8 tensor); ``cuda``: one uint8 tensor per visible GPU
    (empty list without CUDA); ``numpy``: the legacy global ``np.random`` MT19937 state with
    the 624-word key as an int64 tensor; ``python``: ``random.getstate()`` as lists.
    """
    np_state = np.random.get_state(legacy=False)
    py_version, py_words, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": [py_version, list(py_words), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state` (CUDA only when the number of
    visible GPUs matches; otherwise the CUDA generators are left as they are)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))


def save_training_checkpoint(
    out_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    position: LoopPosition,
    rng: list[dict[str, Any]],
    config: dict[str, Any],
    extra: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``checkpoints/step-XXXXXXX.pt`` atomically, then point ``latest`` at it, then
    delete all but the newest ``keep_last`` checkpoints. Returns the checkpoint path.

    ``model`` is the unwrapped module; ``rng`` one :func:`rng_state` per rank; ``extra`` plain
    values stored at the top level (``ValueError`` if a key clashes with the training keys or
    a value is not a tensor / plain value).
    """
    clash = sorted(set(extra) & set(TRAINING_KEYS))
    if clash:
        raise ValueError(f"extra_state uses reserved checkpoint key(s): {', '.join(clash)}")
    payload = {
        "training_format_version": TRAINING_FORMAT_VERSION,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": position.step,
        "epoch": position.epoch,
        "batch_in_epoch": position.batch_in_epoch,
        "rng": rng,
        "config": config,
        **extra,
    }
    folder = checkpoint_dir(out_dir)
    path = folder / checkpoint_name(position.step)
    save_model_state(path, model, payload)
    write_text_atomic(folder / LATEST_FILE, path.name + "\n")
    prune_checkpoints(folder, keep_last)
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The ``step-*.pt`` files in ``folder``, oldest step first (temporary files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, never the one ``latest`` names;
    return the deleted paths."""
    latest = latest_checkpoint(Path(folder).parent)
    old = list_checkpoints(folder)[:-keep_last] if keep_last > 0 else list_checkpoints(folder)
    deleted = [p for p in old if latest is None or p.name != latest.name]
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names, or None when there is no ``latest`` file.

    Raises ``InputError`` if ``latest`` is malformed or names a file that does not exist.
    """
    pointer = checkpoint_dir(out_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not _NAME.match(name):
        raise InputError(f"does not name a checkpoint file (step-XXXXXXX.pt): {name!r}", pointer)
    path = pointer.parent / name
    if not path.is_file():
        raise InputError(f"names {name}, which does not exist", pointer)
    return path


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True`` (on CPU) and check its keys.

    Raises ``InputError`` naming the file if it is unreadable, has another format version, or
    lacks a training key (e.g. a model-only checkpoint).
    """
    try:
        payload = read_checkpoint(path)
    except ValueError as err:
        raise InputError(str(err)) from None
    missing = [key for key in TRAINING_KEYS if key not in payload]
    if missing:
        raise InputError(f"not a training checkpoint (missing {', '.join(missing)})", path)
    if payload["training_format_version"] != TRAINING_FORMAT_VERSION:
        raise InputError(
            f"training_format_version {payload['training_format_version']!r} is not "
            f"{TRAINING_FORMAT_VERSION}", path)
    return payload


def restore_training_state(
    payload: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> LoopPosition:
    """Load model (strict), optimizer, scheduler and scaler states from ``payload``; return the
    loop position. RNG states are restored separately (:func:`set_rng_state`, per rank)."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if payload["scaler"]:
        scaler.load_state_dict(payload["scaler"])
    return LoopPosition(payload["step"], payload["epoch"], payload["batch_in_epoch"])
