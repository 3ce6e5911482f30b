"""`uplvp stage propose` end to end through the CLI on tiny synthetic data."""
import json
import shutil

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pipeline.shards import read_metadata, shard_file
from tests.helpers.propose import propose, read
from uplvp_model.proposal.ingredients import unpack_bits
from tests.helpers import ASSETS



def flat(result) -> str:
    """The command's output with line wrapping undone."""
    return " ".join(result.output.split())


def test_classical_writes_all_shards_with_valid_rows(classical_run):
    out = classical_run
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    masks, images = read(out)
    assert len(images) == 8 and images.image_id.tolist() == list(range(1, 9))
    assert images.status.tolist().count("ok") == 7
    assert len(masks) > 0 and (masks.label == "object").all()
    for row in masks.itertuples():
        decoded = mask_utils.decode({"size": [row.height, row.width], "counts": row.rle_counts})
        assert decoded.shape == (row.height, row.width)
        assert decoded.sum() == row.area
        ys, xs = np.nonzero(decoded)
        assert row.bbox.tolist() == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert unpack_bits(row.shape_grid, 32).shape == (32, 32)
        assert abs(np.linalg.norm(row.clip_embedding.astype(np.float32)) - 1) < 1e-2
    counts = images.set_index("image_id").num_masks
    assert counts.sum() == len(masks)
    record = json.loads((out / "stage.json").read_text())
    assert record["stage"] == "propose" and record["counts"]["images_error"] == 1
    assert record["config"]["proposer"] == "classical"


def test_shards_and_record_say_which_weights_made_them(classical_run):
    none = {"kind": "none", "source": "classical (weight-free)"}
    assert all(read_metadata(p)["weights"] == none for p in classical_run.rglob("shard-*.parquet"))
    assert json.loads((classical_run / "stage.json").read_text())["inputs"]["weights"] == none


def test_corrupt_image_becomes_an_error_row(classical_run):
    _, images = read(classical_run)
    bad = images[images.image_path.str.endswith("unlabeled_000003b.png")].iloc[0]
    assert bad.status == "error" and "not a decodable image" in bad.error
    assert bad.num_masks == 0 and pd.isna(bad.height)


def test_rerun_skips_completed_shards_and_rows_are_identical(pool, classical_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(classical_run, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    result = propose(pool, out)
    assert result.exit_code == 0, result.output
    assert "running 0 shard(s), 3 already complete" in flat(result)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before
    shard_file(out, "images", 1).unlink()  # as if killed before the shard finished
    result = propose(pool, out)
    assert "running 1 shard(s), 2 already complete" in flat(result)
    for a, b in zip(read(out), read(classical_run)):
        pd.testing.assert_frame_equal(a, b)


def test_shard_subsets_produce_exactly_their_shards(pool, classical_run, tmp_path):
    result = propose(pool, tmp_path / "a", "--shards", "1")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == ["shard-00001.parquet"]
    result = propose(pool, tmp_path / "b", "--shard-index", "0", "--num-shards", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "b" / "masks").iterdir()) == [
        "shard-00000.parquet", "shard-00002.parquet"]
    full_masks, _ = read(classical_run)
    part_masks, _ = read(tmp_path / "b")
    expected = full_masks[full_masks.image_id.isin([1, 2, 3, 7, 8])].reset_index(drop=True)
    pd.testing.assert_frame_equal(part_masks, expected)


def test_other_config_in_same_folder_is_refused_unless_overwrite(pool, classical_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(classical_run, out)
    result = propose(pool, out, "--top-k", "3")
    assert result.exit_code == 2 and "holds shards of another config" in flat(result)
    result = propose(pool, out, "--top-k", "3", "--overwrite")
    assert result.exit_code == 0, result.output
    masks, _ = read(out)
    assert masks.groupby("image_id").size().max() <= 3


def test_bad_options_are_one_line_errors(pool, tmp_path):
    assert "--shards: 7 is out of range" in flat(propose(pool, tmp_path / "x", "--shards", "7"))
    result = propose(pool, tmp_path / "y", "--proposer", "nope")
    assert result.exit_code == 2 and "proposer" in result.output


def test_clip_proposer_with_tiny_random_model(pool, tmp_path):
    # random weights mean nothing, so a near-uniform softmax (low temperature) and low thresholds
    # make every image yield masks:
    # this checks the rows' structure (never quality) and cannot pass with zero rows
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("# two classes\ncircle\nsquare\n")
    config = tmp_path / "clip.yaml"
    config.write_text("options: {temperature: 0.001, min_peak: 0.01, threshold: 0.01, max_area_fraction: 1.0}\n")
    args = ("--proposer", "clip", "--clip-model", ASSETS / "tiny-clip-vit.json", "--shards", "0",
            "--device", "cpu", "--vocabulary", vocabulary, "--config", config)
    refused = propose(pool, tmp_path / "clip", *args)  # no checkpoint, random weights not asked
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert ("--proposer clip needs --clip-checkpoint FILE" in flat(refused)
            and "pass --random-weights only for a speed or test run" in flat(refused))
    assert not (tmp_path / "clip").exists()
    result = propose(pool, tmp_path / "clip", *args, "--random-weights")
    assert result.exit_code == 0, result.output
    assert "runs on RANDOM weights" in flat(result)
    weights = {"kind": "random", "source": f"clip {ASSETS / 'tiny-clip-vit.json'}: random init"}
    assert read_metadata(shard_file(tmp_path / "clip", "masks", 0))["weights"] == weights
    record = json.loads((tmp_path / "clip" / "stage.json").read_text())
    assert record["inputs"]["weights"] == weights
    masks, images = read(tmp_path / "clip")
    assert len(images) == 3
    assert sorted(masks.image_id.unique()) == sorted(images.image_id)  # every image has masks
    assert masks.clip_embedding.map(len).unique().tolist() == [32]
    assert set(masks.label_index) <= {0, 1}
    assert masks.score.between(0, 1).all()


def test_freemask_proposer_with_small_random_backbone(pool, tmp_path):
    config = tmp_path / "freemask.yaml"
    config.write_text("options: {backbone: resnet18, input_size: 64}\n")
    args = ("--proposer", "freemask", "--config", config, "--shards", "2", "--device", "cpu")
    refused = propose(pool, tmp_path / "fm", *args)
    assert refused.exit_code == 2 and "--proposer freemask needs --backbone-checkpoint" in flat(refused)
    result = propose(pool, tmp_path / "fm", *args, "--random-weights")
    assert result.exit_code == 0, result.output
    assert read_metadata(shard_file(tmp_path / "fm", "images", 2))["weights"] == {
        "kind": "random", "source": "freemask resnet18: random init"}
    _, images = read(tmp_path / "fm")
    assert images.image_id.tolist() == [7, 8]
