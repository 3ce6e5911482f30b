"""Real photos (../shared/data, the small COCO sets): the readers of issue 31's benchmarks on
them. Skipped where the folder is absent (a user's clone has none)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import importlib
from tests.helpers import DATA, REPO

pytestmark = pytest.mark.skipif(
    not (DATA / "coco_small" / "val.yaml").is_file(),
    reason=f"real photos not found at {DATA} (the small COCO sets of the workplace; a clone "
           "of the repository has none)")


def test_instance_crops_are_every_non_crowd_instance_with_a_big_enough_box():
    probe = importlib.import_module("experiments.backbone_probe")
    crops = probe.instance_crops(DATA / "coco_small" / "val.yaml", crop_size=32, min_side=16,
                                 context=0.1)
    coco = json.loads((DATA / "coco_small" / "instances_val.json").read_text())
    expected = [a["category_id"] for a in sorted(coco["annotations"], key=lambda a: a["image_id"])
                if not a["iscrowd"] and min(a["bbox"][2:]) >= 16]
    assert crops.images.shape == (len(expected), 3, 32, 32)
    assert sorted(crops.labels.tolist()) == sorted(expected)


def test_ground_truth_as_detections_has_an_average_recall_of_one():
    quality = importlib.import_module("tools.propose_quality")
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


def test_overlays_refuse_a_photo_whose_licence_forbids_changes_unless_masks_only(tmp_path):
    import subprocess
    import sys

    import cv2

    val = DATA / "coco_small" / "val.yaml"
    coco = json.loads((DATA / "coco_small" / "instances_val.json").read_text())
    image_id = next(im["id"] for im in coco["images"] if im["license"] == 3)  # CC BY-NC-ND
    args = [sys.executable, "-m", "experiments.real_photo_overlays", "--data", str(val), "--image-ids", str(image_id),
            "--run", 'classical={"proposer": "classical"}', "--out", str(tmp_path), "--width", "200"]
    refused = subprocess.run(args, capture_output=True, text=True,
                             cwd=REPO)
    assert refused.returncode == 1 and "does not allow sharing" in refused.stderr
    assert not list(tmp_path.glob("*.png"))

    drawn = subprocess.run(args + ["--masks-only"], capture_output=True, text=True,
                           cwd=REPO)
    assert drawn.returncode == 0, drawn.stderr
    (png,) = tmp_path.glob(f"overlay_{image_id}.png")
    picture = cv2.imread(str(png))
    assert picture.shape[1] == 2 * (200 + 4)  # ground truth + one run, 4 px gaps
    # the photo is not in it: a grey canvas with flat mask colours blended over it has a few
    # hundred distinct colours at most, the photo scaled to the same width tens of thousands
    from pipeline.images import read_image_rgb
    record = next(im for im in coco["images"] if im["id"] == image_id)
    photo = read_image_rgb(DATA / "coco_small" / "images" / record["file_name"])
    photo = cv2.resize(photo, (200, round(photo.shape[0] * 200 / photo.shape[1])),
                       interpolation=cv2.INTER_AREA)
    body = picture[30:photo.shape[0], :200].reshape(-1, 3)
    photo_colours = len(np.unique(photo.reshape(-1, 3), axis=0))
    assert len(np.unique(body, axis=0)) * 10 < photo_colours
