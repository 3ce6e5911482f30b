"""A toy for the training loop: a tiny MLP, seeded synthetic batches (split over ranks as a
distributed loader splits them), a two-term loss, a quiet TrainConfig, and faults (a crash at a
step, NaN batches)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.engine import TrainConfig
from pipeline.engine.checkpoint import LoopPosition, rng_state, save_training_checkpoint
from uplvp_model.config import model_config
from uplvp_model.model import build_model

IN, HIDDEN = 4, 8


class TinyNet(nn.Module):
    """[B, 4] -> [B, 1]; the dropout makes the loss depend on the global torch RNG."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Dropout(dropout), nn.Linear(HIDDEN, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_net(dropout: float = 0.2, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(dropout)


def global_batch(epoch: int, index: int, size: int, seed: int = 0) -> dict:
    """Batch ``index`` of ``epoch``: x [size, 4], y [size, 1] from a generator seeded by
    (seed, epoch, index); image ids epoch * 1000 + index * size + i."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + index)
    x = torch.randn(size, IN, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(size, 1, generator=g)
    return {"x": x, "y": y, "image_ids": [epoch * 1000 + index * size + i for i in range(size)]}


def synthetic_batches(num_batches: int = 5, size: int = 4, seed: int = 0, rank: int = 0,
                      world_size: int = 1):
    """``make_batches(epoch, start_batch)``: rank r of W yields rows r*size/W ... of each
    global batch (so the union over ranks is the global batch)."""
    per_rank = size // world_size

    def make_batches(epoch: int, start_batch: int = 0):
        for index in range(start_batch, num_batches):
            batch = global_batch(epoch, index, size, seed)
            part = slice(rank * per_rank, (rank + 1) * per_rank)
            yield {"x": batch["x"][part], "y": batch["y"][part], "image_ids": batch["image_ids"][part]}

    return make_batches


def mse_loss(model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
    """Two terms so that per-term logging is exercised; ``loss`` is their sum."""
    err = model(batch["x"]) - batch["y"]
    terms = {"loss_mse": (err ** 2).mean(), "loss_l1": 0.1 * err.abs().mean()}
    terms["loss"] = terms["loss_mse"] + terms["loss_l1"]
    return terms


def quiet(**overrides) -> TrainConfig:
    """A small config without progress bar / TensorBoard (each test turns on what it checks)."""
    values = dict(max_steps=6, checkpoint_every=2, log_every=1, progress=False, tensorboard=False,
                  lr=1e-2, warmup_steps=2)
    values.update(overrides)
    return TrainConfig(**values)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Crash(Exception):
    pass


def crashing(loss_fn, at_step: int):
    """``loss_fn`` that raises ``Crash`` when asked for the loss of step ``at_step``."""

    def wrapped(model, batch, step):
        if step == at_step:
            raise Crash(f"simulated kill at step {step}")
        return loss_fn(model, batch, step)

    return wrapped


def poisoned(make_batches, bad_ids: set[int]):
    """Batches whose x is NaN when they hold one of ``bad_ids``."""

    def make(epoch, start):
        for batch in make_batches(epoch, start):
            if bad_ids & set(batch["image_ids"]):
                batch = {**batch, "x": torch.full_like(batch["x"], float("nan"))}
            yield batch

    return make


def pretrained_checkpoint(tmp_path, **overrides):
    """A training checkpoint of a seeded tiny model (``model_config("tiny", num_classes=1, **overrides)``)
    in ``tmp_path/pre``, as pre-training writes one; returns (path, model)."""
    torch.manual_seed(0)
    cfg = model_config("tiny", num_classes=1, **overrides)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_training_checkpoint(
        tmp_path / "pre", model=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False), position=LoopPosition(1, 0, 1),
        rng=[rng_state()], config={}, extra={"model_config": cfg.to_dict()}, keep_last=1)
    return path, model
