"""The training engine: the loop and what runs around it.

    loop.py         train() / Trainer: optimizer steps, accumulation, clipping, AMP, NaN guard, DDP
    hooks.py        HookBase and the hooks train() uses: metrics lines, evaluation, best and
                    periodic checkpoints (a new hook goes here)
    faults.py       test-only fault hooks (UPLVP_TRAIN_FAULT)
    config.py       TrainConfig and the learning-rate schedule
    checkpoint.py   training checkpoints with exact resume (docs/training.md)
    metrics.py      metrics.jsonl, TensorBoard, progress lines; read_metrics, the one reader
    progress.py     progress bars and plain progress lines for any loop (propose too)
    distributed.py  rank / world size, collectives, seeding, device resolution

Nothing here imports ``stages``; the stages build models, data and losses and call ``train``.
"""
from pipeline.engine.config import TrainConfig, lr_factor
from pipeline.engine.distributed import (
    DistInfo,
    distributed_info,
    init_distributed,
    resolve_device,
    seed_all,
)
from pipeline.engine.faults import FAULT_ENV, TrainFaults
from pipeline.engine.hooks import (
    BestCheckpointer,
    EvalHook,
    HookBase,
    MetricsWriter,
    PeriodicCheckpointer,
)
from pipeline.engine.loop import (
    NonFiniteLossError,
    Trainer,
    TrainResult,
    batch_stream,
    move_to_device,
    param_groups,
    train,
)

__all__ = [
    "FAULT_ENV", "BestCheckpointer", "DistInfo", "EvalHook", "HookBase", "MetricsWriter",
    "NonFiniteLossError", "PeriodicCheckpointer", "TrainConfig", "TrainFaults", "TrainResult",
    "Trainer", "batch_stream", "distributed_info", "init_distributed", "lr_factor",
    "move_to_device", "param_groups", "resolve_device", "seed_all", "train",
]
