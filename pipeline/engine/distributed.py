"""This process's place in a torch.distributed group, and the collectives the loop uses
(each a no-op without an initialised group, so single-process code needs no branches)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


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


def seed_all(seed: int) -> None:
    """Seed ``random``, ``numpy`` (legacy global) and ``torch`` (CPU and CUDA) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce(tensor: Tensor, op: dist.ReduceOp) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, by rank (``[obj]`` without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resolve_device(device: str) -> str:
    """``"auto"``: ``"cuda"`` when CUDA is available, else ``"cpu"``; any other value as is."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
