"""`inspect masks` summaries and `inspect overlay` PNGs of proposal shards."""
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from rich.console import Console

import pipeline.shards as shards_module
from pipeline.errors import InputError
from pipeline.images import read_image_rgb
from pipeline.shards import shard_file, write_shard
from pipeline.synth import write_synth_dataset
from pipeline.overlays import palette, render_overlay
from stages.inspect_masks import (
    AREA_EDGES,
    SCORE_EDGES,
    histogram,
    print_mask_summary,
    run_inspect_masks,
    summarize_masks,
)
from stages.inspect_overlay import draw_overlay
from stages.propose import ProposeConfig, run_propose

BLANK = "unlabeled_000001b.png"  # a flat image: the classical proposer finds no mask in it
CORRUPT = "unlabeled_000002b.png"  # not decodable: an error row


@pytest.fixture(scope="module")
def proposed(tmp_path_factory) -> Path:
    """A classical propose run over 6 synthetic images + a blank one + a corrupt one, in
    shards of 3 (3 shards)."""
    root = tmp_path_factory.mktemp("inspect")
    write_synth_dataset(root / "synth", seed=3, num_unlabeled=6, num_train=1, num_val=1,
                        image_size=64, progress=False)
    images = root / "synth" / "unlabeled" / "images"
    cv2.imwrite(str(images / BLANK), np.full((40, 50, 3), 90, np.uint8))
    (images / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = root / "out"
    cfg = ProposeConfig(images=root / "synth" / "unlabeled.yaml", out=out, num_workers=0,
                        shard_size=3)
    assert run_propose(cfg, progress=False) == 0
    return out


def mask_row(image_id, path, hw, index, box, score, label) -> dict:
    """A masks row whose mask is the filled box ``(x, y, w, h)`` in an image of size ``hw``."""
    x, y, w, h = box
    mask = np.zeros(hw, np.uint8)
    mask[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {
        "image_id": image_id, "image_path": str(path), "height": hw[0], "width": hw[1],
        "mask_index": index, "rle_counts": rle["counts"], "bbox": [float(v) for v in box],
        "area": int(mask.sum()), "score": score, "label": label, "label_index": 0,
        "clip_embedding": [1.0, 0.0], "shape_grid": bytes(2),
    }


def image_row(image_id, path, hw, num_masks, error="") -> dict:
    return {
        "image_id": image_id, "image_path": str(path),
        "height": None if error else hw[0], "width": None if error else hw[1],
        "status": "error" if error else "ok", "error": error, "num_masks": num_masks,
    }


@pytest.fixture
def handmade(tmp_path) -> Path:
    """Two hand-written shards over 64x64 grey images.

    shard 0: image 1 with cat (0.95, 400 px), dog (0.75, 100 px), cat (0.15, 30 px);
             image 2 with no mask.
    shard 1: image 3 with cat (1.0, 2500 px); image 4 an error row.
    """
    hw = (64, 64)
    paths = {}
    for i in (1, 2, 3):
        paths[i] = tmp_path / "img" / f"{i}.png"
        paths[i].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(paths[i]), np.full((*hw, 3), 100, np.uint8))
    paths[4] = tmp_path / "img" / "4.png"
    out = tmp_path / "props"
    write_shard(out, 0, [
        mask_row(1, paths[1], hw, 0, (5, 20, 20, 20), 0.95, "cat"),
        mask_row(1, paths[1], hw, 1, (40, 40, 10, 10), 0.75, "dog"),
        mask_row(1, paths[1], hw, 2, (30, 5, 5, 6), 0.15, "cat"),
    ], [image_row(1, paths[1], hw, 3), image_row(2, paths[2], hw, 0)], "h1")
    write_shard(out, 1, [mask_row(3, paths[3], hw, 0, (0, 0, 50, 50), 1.0, "cat")],
                [image_row(3, paths[3], hw, 1), image_row(4, paths[4], hw, 0, "empty file")],
                "h1")
    return out


# --------------------------------------------------------------------------- summary


def test_summary_matches_pandas_of_the_same_shards(proposed):
    summary = summarize_masks(proposed)
    masks = pd.read_parquet(proposed / "masks")
    images = pd.read_parquet(proposed / "images").sort_values("image_id")
    ok = images[images.status == "ok"]
    assert summary["shards"] == 3 and summary["incomplete_shards"] == []
    assert summary["images"] == {"total": 8, "ok": 7, "error": 1}
    assert summary["masks"] == len(masks) == ok.num_masks.sum()
    assert {d["label"]: d["masks"] for d in summary["labels"]} == masks.label.value_counts().to_dict()
    assert summary["masks_per_image"] == {
        "mean": round(ok.num_masks.mean(), 4), "median": ok.num_masks.median(),
        "max": ok.num_masks.max(),
    }
    assert summary["images_without_masks"]["count"] == 1
    assert summary["images_without_masks"]["examples"][0].endswith(BLANK)
    assert summary["image_errors"]["count"] == 1
    error = summary["image_errors"]["examples"][0]
    assert error["image_path"].endswith(CORRUPT) and "not a decodable image" in error["error"]
    assert summary["config_hash"] == json.loads((proposed / "stage.json").read_text())["config_hash"]


def test_histogram_totals_equal_the_mask_count(proposed):
    summary = summarize_masks(proposed)
    assert sum(b["masks"] for b in summary["score_histogram"]) == summary["masks"]
    assert sum(b["masks"] for b in summary["area_histogram"]) == summary["masks"]
    assert len(summary["score_histogram"]) == 10 and len(summary["area_histogram"]) == 9


def test_histogram_bins_are_half_open_and_the_last_score_bin_is_closed():
    scores = np.array([0.0, 0.05, 0.1, 0.7, 0.95, 1.0], np.float32)
    assert [b["masks"] for b in histogram(scores, SCORE_EDGES)] == [2, 1, 0, 0, 0, 0, 0, 1, 0, 2]
    areas = np.array([0, 31, 32, 127, 128, 600000], np.float64)
    bins = histogram(areas, AREA_EDGES)
    assert [b["masks"] for b in bins] == [2, 2, 1, 0, 0, 0, 0, 0, 1]
    assert (bins[0]["min"], bins[0]["max"], bins[-1]["max"]) == (0, 32, None)


def test_handmade_summary_exact_values(handmade):
    summary = summarize_masks(handmade)
    assert summary["images"] == {"total": 4, "ok": 3, "error": 1}
    assert summary["masks"] == 4
    assert summary["labels"] == [
        {"label": "cat", "masks": 3, "mean_score": round((0.95 + 0.15 + 1.0) / 3, 4)},
        {"label": "dog", "masks": 1, "mean_score": 0.75},
    ]
    assert [b["masks"] for b in summary["score_histogram"]] == [0, 1, 0, 0, 0, 0, 0, 1, 0, 2]
    # areas 400, 100, 30, 2500
    assert [b["masks"] for b in summary["area_histogram"]] == [1, 1, 1, 0, 1, 0, 0, 0, 0]
    assert summary["masks_per_image"] == {"mean": round(4 / 3, 4), "median": 1.0, "max": 3}
    assert summary["images_without_masks"] == {
        "count": 1, "examples": [str(handmade.parent / "img" / "2.png")]}
    assert summary["image_errors"] == {"count": 1, "examples": [
        {"image_id": 4, "image_path": str(handmade.parent / "img" / "4.png"),
         "error": "empty file"}]}
    assert summary["config_hash"] == "h1"


def test_print_shows_counts_bars_and_examples(handmade):
    buffer = io.StringIO()
    print_mask_summary(summarize_masks(handmade), Console(file=buffer, width=100))
    lines = buffer.getvalue().splitlines()
    assert "images: 4 (ok 3, error 1); masks: 4; masks per image: mean 1.3, median 1, max 3" in lines
    assert any(line.split() == ["cat", "3", "0.700"] for line in lines)
    assert any(line.split() == ["dog", "1", "0.750"] for line in lines)
    top = next(line for line in lines if line.startswith("[0.9, 1.0]"))
    assert top.split() == ["[0.9,", "1.0]", "█" * 40, "2"]
    half = next(line for line in lines if line.startswith("[0.1, 0.2)"))
    assert half.split() == ["[0.1,", "0.2)", "█" * 20, "1"]
    assert "images with no masks: 1" in lines and "images with status error: 1" in lines
    assert f"  {handmade.parent / 'img' / '4.png'}: empty file" in lines


def test_json_file_holds_the_summary(handmade, tmp_path):
    summary = run_inspect_masks(handmade, tmp_path / "s.json", Console(file=io.StringIO()))
    assert json.loads((tmp_path / "s.json").read_text()) == summary


def test_summary_never_reads_the_rle_or_embedding_columns(handmade, monkeypatch):
    requested = []
    real = pq.read_table

    def spy(path, columns=None, **kwargs):
        requested.append(columns)
        return real(path, columns=columns, **kwargs)

    monkeypatch.setattr(shards_module.pq, "read_table", spy)
    summarize_masks(handmade)
    assert requested and all(c is not None for c in requested)
    assert not {"rle_counts", "clip_embedding", "shape_grid"} & {c for cs in requested for c in cs}


def test_masks_file_without_images_file_is_listed_and_left_out(handmade):
    shard_file(handmade, "images", 1).unlink()
    summary = summarize_masks(handmade)
    assert summary["incomplete_shards"] == [1]
    assert summary["shards"] == 1 and summary["masks"] == 3 and summary["images"]["total"] == 2


def test_missing_or_empty_folder_is_one_error_line(tmp_path):
    with pytest.raises(InputError, match="proposal folder not found"):
        summarize_masks(tmp_path / "nope")
    with pytest.raises(InputError, match="no proposal shards found"):
        summarize_masks(tmp_path)


def test_truncated_shard_names_the_file(proposed, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(proposed, copy)
    victim = shard_file(copy, "masks", 1)
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(InputError) as err:
        summarize_masks(copy)
    assert str(victim) in str(err.value) and "\n" not in str(err.value)


def test_num_masks_that_disagree_with_the_masks_file_is_an_error(tmp_path):
    hw = (8, 8)
    write_shard(tmp_path, 0, [mask_row(1, "a.png", hw, 0, (0, 0, 2, 2), 0.5, "x")],
                [image_row(1, "a.png", hw, 2)], "h")
    with pytest.raises(InputError, match="image id 1: num_masks is 2 but the masks file"):
        summarize_masks(tmp_path)


def test_score_outside_unit_interval_is_an_error(tmp_path):
    hw = (8, 8)
    write_shard(tmp_path, 0, [mask_row(1, "a.png", hw, 0, (0, 0, 2, 2), 1.5, "x")],
                [image_row(1, "a.png", hw, 1)], "h")
    with pytest.raises(InputError, match=r"image id 1: score 1.5 is outside \[0, 1\]"):
        summarize_masks(tmp_path)


# --------------------------------------------------------------------------- overlay


def test_render_overlay_exact_pixels():
    image = np.full((64, 64, 3), 100, np.uint8)
    mask = np.zeros((1, 64, 64), bool)
    mask[0, 30:46, 5:26] = True  # box x=5, y=30, w=21, h=16
    canvas = render_overlay(image, mask, np.array([[5, 30, 21, 16]], np.float32), ["cat 0.90"])
    colour = palette(1)[0].astype(np.float64)
    assert canvas.shape == image.shape and canvas.dtype == np.uint8
    np.testing.assert_array_equal(canvas[31:45, 6:25], np.broadcast_to(
        np.rint(0.5 * 100 + 0.5 * colour).astype(np.uint8), (14, 19, 3)))
    np.testing.assert_array_equal(canvas[30, 10], colour)  # contour / box edge
    np.testing.assert_array_equal(canvas[50:, 30:], image[50:, 30:])  # far from mask and text
    caption_band = canvas[15:30, 5:60]  # the caption sits just above the box
    assert (caption_band == 255).all(axis=-1).any()


def test_render_overlay_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="do not match"):
        render_overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 5), bool),
                       np.zeros((1, 4)), ["a"])


def test_palette_is_deterministic_and_distinct():
    colours = palette(20)
    assert colours.shape == (20, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 20
    np.testing.assert_array_equal(palette(20)[:5], palette(5))


def test_overlay_has_the_image_size_and_changes_mask_pixels(proposed, tmp_path):
    images = pd.read_parquet(proposed / "images").set_index("image_id")
    masks = pd.read_parquet(proposed / "masks")
    image_id = int(images.index[images.num_masks > 0][0])
    row = images.loc[image_id]
    result = draw_overlay(proposed, image_id, tmp_path / "o.png", max_masks=3)
    assert (result.masks_drawn, result.masks_total) == (3, row.num_masks)
    drawn = read_image_rgb(tmp_path / "o.png")
    assert drawn.shape == (row.height, row.width, 3)
    raw = read_image_rgb(row.image_path)
    raw = cv2.resize(raw, (int(row.width), int(row.height)), interpolation=cv2.INTER_AREA)
    best = masks[(masks.image_id == image_id) & (masks.mask_index == 0)].iloc[0]
    mask = mask_utils.decode({"size": [int(row.height), int(row.width)],
                              "counts": best.rle_counts}).astype(bool)
    changed = (drawn != raw).any(axis=-1)
    assert changed[mask].mean() > 0.9


def test_overlay_min_score_and_max_masks(proposed, tmp_path):
    masks = pd.read_parquet(proposed / "masks")
    image_id = int(masks.image_id.iloc[0])
    scores = masks[masks.image_id == image_id].score
    result = draw_overlay(proposed, image_id, tmp_path / "o.png", min_score=0.3)
    assert result.masks_drawn == min(20, int((scores >= np.float32(0.3)).sum()))
    assert draw_overlay(proposed, image_id, tmp_path / "o.png", max_masks=2).masks_drawn == 2


def test_overlay_of_an_image_without_masks_is_the_image(proposed, tmp_path):
    images = pd.read_parquet(proposed / "images")
    row = images[images.image_path.str.endswith(BLANK)].iloc[0]
    result = draw_overlay(proposed, int(row.image_id), tmp_path / "o.png")
    assert result.masks_drawn == 0
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "o.png"), read_image_rgb(row.image_path))


def test_overlay_errors_name_the_id_and_folder(proposed, tmp_path):
    with pytest.raises(InputError) as err:
        draw_overlay(proposed, 999, tmp_path / "o.png")
    assert str(err.value) == f"{proposed}: image id 999 is not in the proposal shards"
    images = pd.read_parquet(proposed / "images")
    bad = images[images.status == "error"].iloc[0]
    with pytest.raises(InputError, match="could not be read by propose: not a decodable image"):
        draw_overlay(proposed, int(bad.image_id), tmp_path / "o.png")
    with pytest.raises(InputError, match="proposal folder not found"):
        draw_overlay(tmp_path / "nope", 1, tmp_path / "o.png")
    with pytest.raises(InputError, match="--min-score"):
        draw_overlay(proposed, 1, tmp_path / "o.png", min_score=2.0)
    with pytest.raises(InputError, match="--max-masks"):
        draw_overlay(proposed, 1, tmp_path / "o.png", max_masks=0)
    assert not (tmp_path / "o.png").exists()


def test_overlay_of_a_moved_image_is_an_error(handmade, tmp_path):
    (handmade.parent / "img" / "1.png").unlink()
    with pytest.raises(InputError, match="cannot read the image now"):
        draw_overlay(handmade, 1, tmp_path / "o.png")
