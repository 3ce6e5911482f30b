"""Shared fixtures: tiny hand-made labeled datasets written into tmp folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Restore torch's CPU thread count after each test: code under test (a script's
    ``--threads``) may change it, and a changed count changes float results of later tests
    that compare an in-process run with a subprocess run."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def write_image(path: Path, height: int, width: int, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), value, dtype=np.uint8))


def rect_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


@pytest.fixture
def tiny_coco(tmp_path: Path) -> dict:
    """Ten 24x32 images with one or two rectangles each, COCO JSON and a manifest."""
    root = tmp_path / "images"
    images, annotations = [], []
    ann_id = 1
    for i in range(1, 11):
        name = f"img_{i:02d}.png"
        write_image(root / name, 24, 32)
        images.append({"id": i, "file_name": name, "height": 24, "width": 32})
        for k in range(1 + i % 2):
            poly = rect_polygon(2 + 10 * k, 2, 9 + 10 * k, 12)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": i,
                    "category_id": 1 + k,
                    "segmentation": [poly],
                    "area": 70.0,
                    "bbox": [2.0 + 10 * k, 2.0, 7.0, 10.0],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "other"}],
    }
    ann_path = tmp_path / "instances_train.json"
    ann_path.write_text(json.dumps(coco))
    manifest = tmp_path / "train.yaml"
    manifest.write_text(
        "format_version: 1\nname: tiny\nimages:\n  root: images\n  glob: '*.png'\n"
        "annotations: instances_train.json\n"
    )
    return {"dir": tmp_path, "root": root, "coco": coco, "annotations": ann_path, "manifest": manifest}


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
