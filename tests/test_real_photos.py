"""Real photos (../shared/data, the small COCO sets): the readers of issue 31's benchmarks on
them. Skipped where the folder is absent (a user's clone has none)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark_scripts import load_benchmark

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(
    not (DATA / "coco_small" / "val.yaml").is_file(),
    reason=f"real photos not found at {DATA} (the small COCO sets of the workplace; a clone "
           "of the repository has none)")


def test_instance_crops_are_every_non_crowd_instance_with_a_big_enough_box():
    probe = load_benchmark("backbone_probe")
    crops = probe.instance_crops(DATA / "coco_small" / "val.yaml", crop_size=32, min_side=16,
                                 context=0.1)
    coco = json.loads((DATA / "coco_small" / "instances_val.json").read_text())
    expected = [a["category_id"] for a in sorted(coco["annotations"], key=lambda a: a["image_id"])
                if not a["iscrowd"] and min(a["bbox"][2:]) >= 16]
    assert crops.images.shape == (len(expected), 3, 32, 32)
    assert sorted(crops.labels.tolist()) == sorted(expected)


def test_ground_truth_as_detections_has_an_average_recall_of_one():
    quality = load_benchmark("propose_quality")
    from pipeline.coco import ground_truth_rles
    from pipeline.manifest import load_manifest

    coco = load_manifest(DATA / "coco_small" / "val.yaml").coco
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    rows = [{"image_id": image_id, "height": sizes[image_id][0], "width": sizes[image_id][1],
             "score": 1.0, "rle_counts": rle["counts"].decode()}
            for image_id, instances in ground_truth_rles(coco).items()
            for _, _, rle in instances]
    ar = quality.coco_average_recall(pd.DataFrame(rows), coco, max_dets=(100,))
    assert ar["AR@100"] == pytest.approx(1.0)
    assert ar["AR_small@100"] == pytest.approx(1.0) and ar["AR_large@100"] == pytest.approx(1.0)


def test_views_of_real_photos_are_deterministic(tmp_path):
    pytest.importorskip("lightly")
    from pipeline.batching import sample_rng
    from pipeline.manifest import load_manifest
    from pipeline.ssl_views import ViewSource

    records = load_manifest(DATA / "coco_unlabeled" / "unlabeled.yaml").images[:3]
    source = ViewSource(records, image_size=64)
    a = [source.load(i, sample_rng(1, 0, i)) for i in range(3)]
    b = [source.load(i, sample_rng(1, 0, i)) for i in range(3)]
    for x, y in zip(a, b):
        assert x["view_q"].shape == (3, 64, 64)
        assert torch.equal(x["view_q"], y["view_q"]) and torch.equal(x["view_k"], y["view_k"])
    assert not torch.equal(a[0]["view_q"], a[1]["view_q"])
    assert np.isfinite(torch.stack([x["view_k"] for x in a]).numpy()).all()
