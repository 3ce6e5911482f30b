"""Helpers the tests share (fixtures are in ``tests/conftest.py``): the repository root, tiny
images and polygons, and spawning gloo worker processes. Topic helpers: ``tests.helpers.training``
(a toy model and batches for the training loop), ``tests.helpers.converters`` (Cityscapes and
CTW1500 inputs in their real formats), ``tests.helpers.evaluation`` (a labeled set and a stand-in
model with known predictions)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"  # small files the tests read (tiny CLIP configs, images)
DATA = REPO.parent / "shared" / "data"  # the real photos of this workplace (absent in a user's clone)


def write_image(path: Path, height: int, width: int, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), value, dtype=np.uint8))


def rect_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a gloo process group's init_method)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_wait(worker, args: tuple, nprocs: int, timeout_s: float) -> None:
    """``torch.multiprocessing.spawn(worker, args, nprocs)``; kills the workers and fails the
    test if they have not finished within ``timeout_s``."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"spawned workers did not finish in {timeout_s} s")
