"""Pre-training loader over tiny hand-written proposal shards: index, filters, decoding, order,
determinism across workers / ranks / resume, and clear errors for bad shards."""
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.batching import BatchLoader, _in_order
from pipeline.errors import InputError
from pipeline.images import read_image_rgb
from pipeline.shard_dataset import MaskFilter, ShardDataset, pretrain_loader
from pipeline.shards import shard_file, write_shard
from pipeline.transforms import AugmentConfig, eval_config
from uplvp_model.proposal.ingredients import mask_box_xywh, pack_bits, shape_grid

H, W, G = 16, 24, 8
JITTER = AugmentConfig(short_side=(12, 20), max_long_side=40, flip_prob=0.5)


def _rect(y0, y1, x0, x1, h=H, w=W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _mask_row(image_id, path, k, mask, score, h=H, w=W) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {
        "image_id": image_id, "image_path": str(path), "height": h, "width": w,
        "mask_index": k, "rle_counts": rle["counts"], "bbox": list(mask_box_xywh(mask)),
        "area": int(mask.sum()), "score": score, "label": "thing", "label_index": 0,
        "clip_embedding": np.array([k, image_id, 0, 1], dtype=np.float16),
        "shape_grid": pack_bits(shape_grid(mask, G)),
    }


def _image_masks(i: int) -> list[tuple[np.ndarray, float]]:
    """Pseudo masks of image i as (mask, score); see the expected counts in the tests."""
    if i == 2:  # 25 valid masks: capped to the best 20
        return [(_rect(k % 8, k % 8 + 6, k % 16, k % 16 + 8), 0.5 + 0.01 * ((k * 7) % 25))
                for k in range(25)]
    if i == 4:  # nothing survives: too small, then too unsure
        return [(_rect(0, 4, 0, 5), 0.95), (_rect(5, 11, 5, 11), 0.4)]
    return [
        (_rect(0, 4, 0, 5), 0.95),  # area 20 < 32: dropped
        (_rect(2, 7, 3 + i, 11 + i), 0.9),  # area 40: kept
        (_rect(8, 14, 8, 14), 0.4),  # score < 0.5: dropped
        (_rect(10, 14, 0, 8), 0.5),  # exactly at both thresholds (area 32, score 0.5): kept
    ]


def write_tiny_shards(root: Path, shard_size: int = 3, config_hash: str = "h1") -> Path:
    """Ten images (ids 1..10) in shards of 3: image 7 unreadable (status error), image 4 has no
    mask passing the filter, image 2 has 25 masks, image 10's file is twice the row size."""
    out = root / "proposals"
    rng = np.random.default_rng(0)
    for shard, start in enumerate(range(1, 11, shard_size)):
        mask_rows, image_rows = [], []
        for i in range(start, min(start + shard_size, 11)):
            path = root / "images" / f"img_{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            size = (2 * H, 2 * W) if i == 10 else (H, W)
            cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            if i == 7:
                image_rows.append({"image_id": i, "image_path": str(path), "height": None,
                                   "width": None, "status": "error", "error": "broken",
                                   "num_masks": 0})
                continue
            masks = _image_masks(i)
            mask_rows += [_mask_row(i, path, k, m, s) for k, (m, s) in enumerate(masks)]
            image_rows.append({"image_id": i, "image_path": str(path), "height": H, "width": W,
                               "status": "ok", "error": "", "num_masks": len(masks)})
        write_shard(out, shard, mask_rows, image_rows, config_hash)
    return out


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_tiny_shards(tmp_path)


def _dataset(shards, **kw) -> ShardDataset:
    kw.setdefault("augment_config", JITTER)
    return ShardDataset(shards, grid_size=G, **kw)


def _per_sample(batch: dict) -> list[tuple]:
    """Batch -> per-image content independent of the batch's padding (boxes back in pixels)."""
    pad_h, pad_w = batch["images"].shape[-2:]
    out = []
    for i, (h, w) in enumerate(batch["image_sizes"]):
        prompts = batch["prompts"][i]
        boxes = prompts["boxes"] * torch.tensor([pad_w, pad_h, pad_w, pad_h])
        out.append((
            batch["image_ids"][i], (h, w), batch["orig_sizes"][i],
            batch["images"][i, :, :h, :w].numpy().tobytes(),
            batch["targets"][i]["masks"][:, :h, :w].numpy().tobytes(),
            batch["targets"][i]["labels"].tolist(),
            boxes.round().tolist(), prompts["shape_grids"].tolist(), prompts["embeddings"].tolist(),
        ))
    return out


def _epoch(loader: BatchLoader, epoch: int, start: int = 0) -> list[list[tuple]]:
    return [_per_sample(b) for b in loader.make_batches(epoch, start)]


def test_index_counts_and_filters(shards):
    ds = _dataset(shards)
    assert ds.counts == {"images": 10, "images_error": 1, "images_without_masks": 1,
                         "images_used": 8}
    assert ds.image_ids.tolist() == [1, 2, 3, 5, 6, 8, 9, 10]
    stricter = _dataset(shards, mask_filter=MaskFilter(min_score=0.6, min_area=33, max_masks=20))
    # image 2 keeps its masks with score >= 0.6 (15 of 25); the others keep only the area-40 mask
    assert stricter.counts["images_used"] == 8
    assert len(stricter.raw_sample(1).masks) == 15
    assert [len(stricter.raw_sample(k).masks) for k in (0, 2, 3)] == [1, 1, 1]


def test_raw_sample_decodes_masks_grids_embeddings(shards):
    ds = _dataset(shards)
    s = ds.raw_sample(0)  # image 1: masks 1 (score 0.9) and 3 (0.5), in score order
    assert s.image_id == 1 and s.orig_size == (H, W) and s.image.shape == (H, W, 3)
    assert s.image.tolist() == read_image_rgb(shards.parent / "images" / "img_01.png").tolist()
    assert s.masks.dtype == bool
    assert s.masks.tolist() == [_rect(2, 7, 4, 12).tolist(), _rect(10, 14, 0, 8).tolist()]
    assert s.shape_grids.tolist() == [shape_grid(m, G).tolist() for m in s.masks]
    assert s.embeddings.dtype == np.float32
    assert s.embeddings.tolist() == [[1, 1, 0, 1], [3, 1, 0, 1]]
    assert s.labels.tolist() == [0, 0]


def test_max_masks_keeps_best_scores_in_order(shards):
    s = _dataset(shards).raw_sample(1)  # image 2
    scores = {k: 0.5 + 0.01 * ((k * 7) % 25) for k in range(25)}
    expected = sorted(scores, key=lambda k: -scores[k])[:20]
    assert s.embeddings[:, 0].astype(int).tolist() == expected
    assert len(_dataset(shards, mask_filter=MaskFilter(max_masks=3)).raw_sample(1).masks) == 3


def test_downscaled_image_matches_propose_and_replaced_image_is_an_error(shards):
    ds = _dataset(shards)
    s = ds.raw_sample(7)  # image 10: file 32x48, proposed at 16x24
    assert s.image.shape == (H, W, 3)
    assert s.image.tolist() == read_image_rgb(shards.parent / "images" / "img_10.png", W).tolist()
    cv2.imwrite(str(shards.parent / "images" / "img_01.png"), np.zeros((H, W + 8, 3), np.uint8))
    with pytest.raises(InputError, match="replaced after propose") as err:
        ds.raw_sample(0)
    assert "img_01.png" in str(err.value) and "\n" not in str(err.value)


def test_epoch_order_is_seeded_and_windowed(shards):
    ds = _dataset(shards)
    orders = [ds.epoch_order(0, e).tolist() for e in (0, 0, 1)]
    assert orders[0] == orders[1] and orders[0] != orders[2]
    assert sorted(orders[0]) == list(range(8))
    per_shard = _dataset(shards, shards_per_window=1)
    for epoch in range(3):
        shard_seq = per_shard.shard_of[per_shard.epoch_order(5, epoch)].tolist()
        blocks = [k for j, k in enumerate(shard_seq) if j == 0 or shard_seq[j - 1] != k]
        assert sorted(blocks) == [0, 1, 2, 3]  # every shard is one contiguous block


def test_batches_deterministic_epochs_differ_and_start_batch_skips(shards):
    loader = pretrain_loader(shards, 4, seed=3, augment_config=JITTER, grid_size=G)
    assert loader.batches_per_epoch() == 2
    first = _epoch(loader, 0)
    assert len(first) == 2 and [len(b) for b in first] == [4, 4]
    assert first == _epoch(loader, 0)
    second = _epoch(loader, 1)
    assert [s[0] for b in first for s in b] != [s[0] for b in second for s in b]
    assert _epoch(loader, 1, start=1) == second[1:]
    assert _epoch(loader, 1, start=2) == []
    assert sorted(s[0] for b in first for s in b) == [1, 2, 3, 5, 6, 8, 9, 10]
    batch = next(loader.make_batches(0))
    assert batch["images"].shape[-2] % 32 == 0 and batch["images"].shape[-1] % 32 == 0
    assert all(p["boxes"].shape[1] == 4 and p["embeddings"].shape[1] == 4 for p in batch["prompts"])


def test_workers_and_ranks_give_the_single_process_batches(shards):
    def loader(**kw):
        return pretrain_loader(shards, 4, seed=11, augment_config=JITTER, grid_size=G,
                               shards_per_window=2, **kw)

    reference = _epoch(loader(), 2)
    torch_state = torch.get_rng_state()
    assert _epoch(loader(num_workers=2), 2) == reference
    assert torch.equal(torch.get_rng_state(), torch_state)  # global RNG untouched
    rank0 = _epoch(loader(rank=0, world_size=2), 2)
    rank1 = _epoch(loader(rank=1, world_size=2), 2)
    assert [len(b) for b in rank0 + rank1] == [2, 2, 2, 2]
    assert [r0 + r1 for r0, r1 in zip(rank0, rank1)] == reference
    with pytest.raises(InputError, match="multiple of the number of processes"):
        loader(rank=0, world_size=3)
    with pytest.raises(InputError, match="only 8 usable images, fewer than one batch of 10"):
        pretrain_loader(shards, 10, seed=0, grid_size=G)


def test_worker_error_is_one_input_error_line(shards):
    (shards.parent / "images" / "img_05.png").unlink()
    loader = pretrain_loader(shards, 2, seed=0, augment_config=eval_config(16, 40), grid_size=G,
                             num_workers=2)
    with pytest.raises(InputError, match="cannot be read now") as err:
        list(loader.make_batches(0))
    assert "img_05.png" in str(err.value) and "\n" not in str(err.value)


def _one_line_error(shards: Path, match: str) -> str:
    with pytest.raises(InputError, match=match) as err:
        _dataset(shards)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_truncated_shard_is_one_clear_error(shards):
    path = shard_file(shards, "masks", 1)
    path.write_bytes(path.read_bytes()[:100])
    assert str(path) in _one_line_error(shards, "not a readable Parquet file")


def test_foreign_shard_is_one_clear_error(shards):
    path = shard_file(shards, "images", 2)
    pq.write_table(pa.table({"a": [1, 2]}), path)
    assert str(path) in _one_line_error(shards, "no uplvp shard metadata")


def test_incomplete_and_mixed_shards_are_errors(tmp_path, shards):
    other = write_tiny_shards(tmp_path / "other", config_hash="h2")
    shard_file(other, "images", 3).replace(shard_file(shards, "images", 3))
    _one_line_error(shards, "masks and images files of shard 3 come from different propose runs")
    shard_file(other, "masks", 3).replace(shard_file(shards, "masks", 3))
    _one_line_error(shards, "shard 0 has config hash h1, shard 3 has h2")
    shard_file(shards, "masks", 0).unlink()
    _one_line_error(shards, "shard 0 is incomplete")
    with pytest.raises(InputError, match="no proposal shards found"):
        ShardDataset(tmp_path / "empty", augment_config=JITTER)


def test_wrong_grid_size_is_an_error(shards):
    ds = ShardDataset(shards, augment_config=JITTER, grid_size=16)
    with pytest.raises(InputError, match=r"shape_grid \(grid_size 16\).*expected 32"):
        ds.raw_sample(0)


def test_batches_arriving_out_of_order_are_reordered():
    arrivals = [(2, "c"), (0, "a"), (3, "d"), (1, "b")]
    assert list(_in_order(iter(arrivals))) == ["a", "b", "c", "d"]
    with pytest.raises(RuntimeError, match="batch 1 never did"):
        list(_in_order(iter([(0, "a"), (2, "c")])))


def test_mask_rows_of_another_size_than_the_image_row_are_an_error(tmp_path):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.zeros((H, W, 3), np.uint8))
    mask = _rect(0, 8, 0, 8, h=10, w=10)
    image_row = {"image_id": 1, "image_path": str(path), "height": H, "width": W,
                 "status": "ok", "error": "", "num_masks": 1}
    write_shard(tmp_path / "p", 0, [_mask_row(1, path, 0, mask, 0.9, h=10, w=10)], [image_row], "h")
    with pytest.raises(InputError, match="another height/width than its images row"):
        _dataset(tmp_path / "p").raw_sample(0)
