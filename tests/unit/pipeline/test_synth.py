"""The synthetic demo dataset: determinism, COCO validity, occlusion, manifests."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from pipeline.errors import InputError
from pipeline.manifest import load_manifest
from pipeline.synth import (
    CATEGORIES,
    MIN_VISIBLE_AREA,
    SynthCategory,
    generate_image,
    image_shapes,
    synth_example,
    write_synth_dataset,
)

COUNTS = {"unlabeled": 4, "train": 3, "val": 3}


def _write(out: Path, seed: int = 0, **counts: int) -> dict:
    n = {**COUNTS, **counts}
    return write_synth_dataset(
        out, seed=seed, num_unlabeled=n["unlabeled"], num_train=n["train"], num_val=n["val"],
        progress=False,
    )


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    return out, _write(out)


def test_writes_expected_files_and_counts(dataset):
    out, summary = dataset
    assert sorted(_files(out)) == sorted(
        [f"unlabeled/images/unlabeled_{i:06d}.png" for i in range(4)]
        + [f"{s}/images/{s}_{i:06d}.png" for s in ("train", "val") for i in range(3)]
        + ["train/annotations.json", "val/annotations.json", "unlabeled/generator_annotations.json"]
        + ["unlabeled.yaml", "train.yaml", "val.yaml"]
    )
    assert {s: v["images"] for s, v in summary["splits"].items()} == COUNTS
    assert summary["splits"]["unlabeled"]["instances"] == 0
    for split in ("train", "val"):
        coco = json.loads((out / split / "annotations.json").read_text())
        assert summary["splits"][split]["instances"] == len(coco["annotations"]) > 0
        assert [im["id"] for im in coco["images"]] == [1, 2, 3]
        names = [f"{split}_{i:06d}.png" for i in range(3)]
        assert [im["file_name"] for im in coco["images"]] == names
        ann_ids = [a["id"] for a in coco["annotations"]]
        assert ann_ids == list(range(1, len(ann_ids) + 1))
        assert coco["categories"] == [
            {"id": c.id, "name": c.name, "supercategory": "shape"} for c in CATEGORIES
        ]
        assert [c["id"] for c in coco["categories"]] == list(range(1, 9))


def test_png_size_matches_coco_record(dataset):
    out, _ = dataset
    coco = json.loads((out / "train" / "annotations.json").read_text())
    for im in coco["images"]:
        bgr = cv2.imread(str(out / "train" / "images" / im["file_name"]), cv2.IMREAD_UNCHANGED)
        assert bgr.shape == (im["height"], im["width"], 3) and bgr.dtype == np.uint8


def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
    out, _ = dataset
    _write(tmp_path / "again")
    assert _files(tmp_path / "again") == _files(out)


def test_other_seed_gives_different_images(dataset, tmp_path):
    out, _ = dataset
    _write(tmp_path / "seed1", seed=1)
    for name in ("unlabeled/images/unlabeled_000000.png", "train/images/train_000000.png"):
        assert (tmp_path / "seed1" / name).read_bytes() != (out / name).read_bytes()


def test_images_do_not_depend_on_other_split_counts(dataset, tmp_path):
    out, _ = dataset
    _write(tmp_path / "other", unlabeled=1, train=2, val=0)
    ref, other = _files(out), _files(tmp_path / "other")
    for name in ("unlabeled/images/unlabeled_000000.png", "train/images/train_000000.png",
                 "train/images/train_000001.png"):
        assert other[name] == ref[name]


def test_splits_never_share_images(dataset):
    out, _ = dataset
    images = [b for name, b in _files(out).items() if name.endswith(".png")]
    assert len(set(images)) == len(images) == 10


def test_annotations_load_in_pycocotools_with_exact_areas(dataset):
    out, _ = dataset
    for split in ("train", "val"):
        coco = COCO(str(out / split / "annotations.json"))
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.loadImgs(ann["image_id"])[0]
            mask = coco.annToMask(ann)
            assert mask.shape == (img["height"], img["width"])
            assert ann["area"] >= MIN_VISIBLE_AREA
            assert int(mask.sum()) == ann["area"]  # polygons rasterise back to the exact pixels
            assert ann["iscrowd"] == 0
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert [x, y, w, h] == tight


def test_annotations_equal_generated_visible_masks(dataset):
    out, _ = dataset
    coco = COCO(str(out / "val" / "annotations.json"))
    img = coco.loadImgs(2)[0]
    image, instances = synth_example(0, "val", 1)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[2]))
    assert (img["height"], img["width"]) == image.shape[:2]
    assert len(anns) >= 1
    assert [a["category_id"] for a in anns] == [c for c, _ in instances]
    for ann, (_, mask) in zip(anns, instances):
        assert np.array_equal(coco.annToMask(ann).astype(bool), mask)


def test_manifests_load(dataset):
    out, _ = dataset
    unlabeled = load_manifest(out / "unlabeled.yaml")
    assert not unlabeled.labeled
    assert [im.file_name for im in unlabeled.images] == [f"unlabeled_{i:06d}.png" for i in range(4)]
    train = load_manifest(out / "train.yaml")
    assert train.labeled and len(train.images) == 3
    assert train.name == "synth-train"
    assert [c["name"] for c in train.categories] == [c.name for c in CATEGORIES]


def test_scenes_are_non_square_occluded_and_masks_disjoint():
    sizes, touching_pairs, counts = set(), 0, []
    for index in range(24):
        image, instances = synth_example(3, "train", index)
        height, width = image.shape[:2]
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        sizes.add((height, width))
        counts.append(len(instances))
        masks = [m for _, m in instances]
        for m in masks:
            assert m.shape == (height, width) and m.dtype == bool
        stack = np.stack(masks).astype(int) if masks else np.zeros((1, height, width), int)
        assert stack.sum(axis=0).max() <= 1  # visible masks never overlap
        for i, a in enumerate(masks):  # touching visible parts: one object occludes another
            grown = cv2.dilate(a.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            touching_pairs += sum(bool((grown & b).any()) for b in masks[i + 1:])
    assert any(h != w for h, w in sizes)
    assert touching_pairs >= 5
    assert min(counts) >= 1 and max(counts) >= 5


def test_generate_image_is_deterministic_and_seed_dependent():
    a_img, a_inst = generate_image(np.random.default_rng(7), 96, 128)
    b_img, b_inst = generate_image(np.random.default_rng(7), 96, 128)
    c_img, _ = generate_image(np.random.default_rng(8), 96, 128)
    assert np.array_equal(a_img, b_img)
    assert [c for c, _ in a_inst] == [c for c, _ in b_inst]
    assert all(np.array_equal(m, n) for (_, m), (_, n) in zip(a_inst, b_inst))
    assert not np.array_equal(a_img, c_img)


def test_generate_image_uses_given_categories_only():
    cats = [SynthCategory(5, "star", "dots", 120.0)]
    ids = set()
    for seed in range(4):
        ids |= {c for c, _ in generate_image(np.random.default_rng(seed), 64, 80, cats)[1]}
    assert ids == {5}


def test_generate_image_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blob"):
        generate_image(np.random.default_rng(0), 64, 64, [SynthCategory(1, "blob", "dots", 0.0)])
    with pytest.raises(ValueError, match="16x16"):
        generate_image(np.random.default_rng(0), 8, 64)


def test_image_shapes_scale_with_base_size():
    assert image_shapes(128) == [(96, 128), (120, 160), (128, 128), (144, 112)]
    assert image_shapes(256) == [(192, 256), (240, 320), (256, 256), (288, 224)]


def test_rewrite_with_fewer_images_removes_stale_ones(tmp_path):
    _write(tmp_path, unlabeled=3, train=2, val=1)
    _write(tmp_path, unlabeled=1, train=1, val=1)
    assert sorted(p.name for p in (tmp_path / "unlabeled" / "images").iterdir()) == [
        "unlabeled_000000.png"
    ]
    assert len(json.loads((tmp_path / "train" / "annotations.json").read_text())["images"]) == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [({"seed": -1}, "seed"), ({"num_train": -2}, "train"), ({"image_size": 32}, "image_size")],
)
def test_bad_arguments_raise_input_error(tmp_path, kwargs, field):
    with pytest.raises(InputError, match=field):
        write_synth_dataset(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_unlabeled_truth_is_what_the_generator_drew_and_no_manifest_names_it(dataset):
    import json

    import yaml

    from pipeline.synth import UNLABELED_TRUTH_FILE, synth_example

    out, summary = dataset
    truth = json.loads((out / "unlabeled" / UNLABELED_TRUTH_FILE).read_text())
    assert [img["file_name"] for img in truth["images"]] == [
        f"unlabeled_{i:06d}.png" for i in range(4)]
    _, instances = synth_example(summary["seed"], "unlabeled", 2, summary["image_size"])
    drawn = [(c, int(m.sum())) for c, m in instances]
    assert [(a["category_id"], a["area"]) for a in truth["annotations"] if a["image_id"] == 3] == drawn
    manifest = yaml.safe_load((out / "unlabeled.yaml").read_text())
    assert "annotations" not in manifest
