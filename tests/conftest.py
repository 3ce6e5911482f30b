"""Shared fixtures: tiny hand-made labeled datasets written into tmp folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import shutil

import pytest

from pipeline.synth import write_synth_dataset
from tests.helpers import rect_polygon, write_image
from tests.helpers.propose import propose

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


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """(propose tests) 7 unlabeled synthetic images + one corrupt file, and a manifest over all 8."""
    root = tmp_path_factory.mktemp("pool")
    write_synth_dataset(root / "synth", seed=5, num_unlabeled=7, num_train=1, num_val=1,
                        image_size=64, progress=False)
    images = root / "images"
    shutil.copytree(root / "synth" / "unlabeled" / "images", images)
    (images / "unlabeled_000003b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    manifest = root / "pool.yaml"
    manifest.write_text("name: pool\nimages: {root: images, glob: '*.png'}\n")
    return manifest


@pytest.fixture(scope="module")
def classical_run(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("classical")
    result = propose(pool, out)
    assert result.exit_code == 0, result.output
    return out
