"""Fine-tuning / evaluation loaders over a tiny hand-made COCO set: instances, category map,
skipped images, determinism across workers and ranks, evaluation order and sizes."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.coco import mask_to_rle
from pipeline.coco_dataset import CocoDataset, category_ids, eval_loader, finetune_loader
from pipeline.errors import InputError
from pipeline.manifest import load_manifest
from pipeline.transforms import AugmentConfig, eval_config

H, W = 20, 28
JITTER = AugmentConfig(short_side=(14, 26), max_long_side=60, flip_prob=0.5)


def _rect(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _rect_mask(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _ann(ann_id, image_id, cat, seg, crowd=0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": seg,
            "area": 1.0, "bbox": [0, 0, 1, 1], "iscrowd": crowd}


def write_tiny_coco(root: Path, labeled: bool = True) -> Path:
    """Six 20x28 images; categories 3, 7, 5 (map -> [3, 5, 7]). Image 1: a cat-7 polygon, a
    cat-3 RLE, a crowd; image 2: only a crowd; image 3: nothing; image 4: a cat-5 polygon and a
    degenerate (empty) polygon; images 5, 6: one cat-3 polygon each."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(1, 7):
        name = f"im{i}.png"
        (root / "images").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / name), rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        images.append({"id": i, "file_name": name, "height": H, "width": W})
    annotations = [
        _ann(1, 1, 7, [_rect(2, 2, 10, 8)]),
        _ann(2, 1, 3, mask_to_rle(_rect_mask(12, 4, 20, 16))),
        _ann(3, 1, 5, [_rect(0, 0, 28, 20)], crowd=1),
        _ann(4, 2, 5, [_rect(0, 0, 5, 5)], crowd=1),
        _ann(5, 4, 5, [_rect(4, 10, 24, 18)]),
        _ann(6, 4, 3, [[5, 5, 5, 5, 5, 5]]),
        _ann(7, 5, 3, [_rect(1, 1, 9, 9)]),
        _ann(8, 6, 3, [_rect(3, 3, 20, 12)]),
    ]
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 3, "name": "c"}, {"id": 7, "name": "g"}, {"id": 5, "name": "e"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    manifest = root / "set.yaml"
    text = "format_version: 1\nname: tiny\nimages:\n  root: images\n  glob: '*.png'\n"
    manifest.write_text(text + ("annotations: instances.json\n" if labeled else ""))
    return manifest


@pytest.fixture
def dataset(tmp_path):
    return load_manifest(write_tiny_coco(tmp_path))


def _per_sample(batch: dict) -> list[tuple]:
    out = []
    for i, (h, w) in enumerate(batch["image_sizes"]):
        out.append((batch["image_ids"][i], (h, w), batch["orig_sizes"][i],
                    batch["images"][i, :, :h, :w].numpy().tobytes(),
                    batch["targets"][i]["masks"][:, :h, :w].numpy().tobytes(),
                    batch["targets"][i]["labels"].tolist()))
    return out


def _epoch(loader, epoch, start=0) -> list[list[tuple]]:
    return [_per_sample(b) for b in loader.make_batches(epoch, start)]


def test_category_map_instances_and_skips(dataset):
    assert category_ids(dataset.categories) == [3, 5, 7]
    train = CocoDataset(dataset, augment_config=JITTER, skip_empty=True)
    assert train.counts == {"images": 6, "images_without_instances": 2, "images_used": 4}
    assert [r.image_id for r in train.records] == [1, 4, 5, 6]
    s = train.raw_sample(0)
    assert s.image_id == 1 and s.orig_size == (H, W) and s.image.shape == (H, W, 3)
    # polygon rasterisation covers pixel centres strictly inside: columns 2..9, rows 2..7
    assert s.masks.tolist() == [_rect_mask(2, 2, 10, 8).tolist(),
                                _rect_mask(12, 4, 20, 16).tolist()]
    assert s.labels.tolist() == [2, 0]  # category 7 -> 2, category 3 -> 0; crowd left out
    s4 = train.raw_sample(1)
    assert s4.labels.tolist() == [1] and s4.masks.shape == (1, H, W)  # empty polygon dropped
    everything = CocoDataset(dataset, augment_config=JITTER)
    assert len(everything) == 6 and everything.raw_sample(2).masks.shape == (0, H, W)


def test_finetune_batches_deterministic_workers_ranks_resume(dataset):
    def loader(**kw):
        return finetune_loader(dataset, 2, seed=4, augment_config=JITTER, **kw)

    ref = _epoch(loader(), 0)
    assert [len(b) for b in ref] == [2, 2] and ref == _epoch(loader(), 0)
    assert sorted(s[0] for b in ref for s in b) == [1, 4, 5, 6]
    assert [s[0] for b in ref for s in b] != [s[0] for b in _epoch(loader(), 1) for s in b]
    assert _epoch(loader(num_workers=2), 0) == ref
    rank0 = _epoch(loader(rank=0, world_size=2), 0)
    rank1 = _epoch(loader(rank=1, world_size=2), 0)
    assert [r0 + r1 for r0, r1 in zip(rank0, rank1)] == ref
    assert _epoch(loader(), 0, start=1) == ref[1:]
    batch = next(loader().make_batches(0))
    assert "prompts" not in batch and batch["images"].dtype == torch.float32
    assert batch["targets"][0]["labels"].dtype == torch.long


def test_eval_loader_fixed_order_sizes_and_partial_last_batch(dataset):
    loader = eval_loader(dataset, 4, resize=eval_config(40, 100))
    batches = list(loader.make_batches(0))
    assert [b["image_ids"] for b in batches] == [[1, 2, 3, 4], [5, 6]]
    assert batches[0]["image_sizes"] == [(40, 56)] * 4 and batches[0]["orig_sizes"] == [(H, W)] * 4
    assert batches[0]["images"].shape == (4, 3, 64, 64)
    assert batches[0]["targets"][0]["labels"].tolist() == [2, 0]
    assert [b["image_ids"] for b in eval_loader(dataset, 4, resize=eval_config(40, 100))
            .make_batches(3)] == [[1, 2, 3, 4], [5, 6]]
    ranks = [[b["image_ids"] for b in eval_loader(dataset, 4, resize=eval_config(40, 100),
                                                 rank=r, world_size=2).make_batches(0)]
             for r in (0, 1)]
    assert ranks == [[[1, 2], [5, 6]], [[3, 4]]]
    with pytest.raises(InputError, match="fixed resize without flip"):
        eval_loader(dataset, 4, resize=JITTER)


def test_eval_loader_on_unlabeled_manifest(tmp_path):
    unlabeled = load_manifest(write_tiny_coco(tmp_path, labeled=False))
    batch = next(eval_loader(unlabeled, 6, resize=eval_config(20, 28)).make_batches(0))
    assert batch["image_ids"] == [1, 2, 3, 4, 5, 6] and batch["orig_sizes"] == [(H, W)] * 6
    assert all(t["masks"].shape == (0, 32, 32) for t in batch["targets"])
    with pytest.raises(InputError, match="training needs a labeled dataset"):
        finetune_loader(unlabeled, 2, seed=0)


def test_bad_inputs_are_one_line_errors(dataset, tmp_path):
    with pytest.raises(InputError, match="category_id 7 is not in the category map") as err:
        CocoDataset(dataset, augment_config=JITTER, category_map=[3, 5])
    assert "instances.json" in str(err.value)
    cv2.imwrite(str(tmp_path / "images" / "im5.png"), np.zeros((H + 1, W, 3), np.uint8))
    loader = finetune_loader(dataset, 4, seed=0, augment_config=JITTER)
    with pytest.raises(InputError, match="21x28 but its annotations say 20x28") as err:
        list(loader.make_batches(0))
    assert "im5.png" in str(err.value) and "\n" not in str(err.value)
