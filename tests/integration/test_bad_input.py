"""Bad input through the CLI, table-driven: every stage that consumes a broken COCO file,
manifest, shard folder or checkpoint prints exactly one ``error: <file>: <problem>`` line on
stderr, exits 2 and shows no traceback. (The validators themselves are unit-tested in
tests/unit/pipeline/test_coco.py, tests/unit/pipeline/test_manifest.py and tests/unit/pipeline/test_shards.py; this file checks the
stages that consume them.)
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipeline.shards import META_KEY
from pipeline.synth import write_synth_dataset
from stages.cli import app
from stages.propose import ProposeConfig, run_propose


def bad_input(args: list[str]) -> str:
    """Run the CLI, check exit 2 with one stderr line and no traceback; return that line with
    whitespace (rich line wrapping) normalised."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return " ".join(result.stderr[result.stderr.index("error:"):].split())


# --------------------------------------------------------------------------- COCO files

def _image_id_as_string(coco: dict) -> None:
    coco["images"][0]["id"] = "1"


def _unknown_category(coco: dict) -> None:
    coco["annotations"][0]["category_id"] = 99


def _two_point_polygon(coco: dict) -> None:
    coco["annotations"][0]["segmentation"] = [[2, 2, 9, 12]]


def _rle_of_wrong_size(coco: dict) -> None:
    coco["annotations"][0]["segmentation"] = {"size": [10, 10], "counts": "PP2"}


def _duplicate_image_id(coco: dict) -> None:
    coco["images"][1]["id"] = coco["images"][0]["id"]


def _duplicate_annotation_id(coco: dict) -> None:
    coco["annotations"][1]["id"] = coco["annotations"][0]["id"]


def _bbox_of_strings(coco: dict) -> None:
    coco["annotations"][0]["bbox"] = ["2", "2", "7", "10"]


COCO_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    "wrong type": (_image_id_as_string, "images[0].id must be an integer"),
    "unknown category id": (_unknown_category, "annotations[0] (id 1) has unknown category id 99"),
    "polygon < 3 points": (
        _two_point_polygon,
        "annotations[0].segmentation[0] needs an even count of >= 6 numbers (>= 3 points), got 4"),
    "RLE of wrong size": (
        _rle_of_wrong_size, "annotations[0].segmentation RLE size [10, 10] != image size [24, 32]"),
    "duplicate image id": (_duplicate_image_id, "duplicate image id 1"),
    "duplicate annotation id": (_duplicate_annotation_id, "duplicate annotation id 1"),
    "bbox of wrong type": (_bbox_of_strings, "annotations[0].bbox must be 4 numbers"),
}

COMMANDS: dict[str, Callable[[dict, Path], list]] = {
    "data check": lambda d, out: ["data", "check", d["manifest"]],
    "data split": lambda d, out: ["data", "split", "--annotations", d["annotations"],
                                  "--percent", "50", "--out", out],
    "stage finetune": lambda d, out: ["stage", "finetune", "--train", d["manifest"], "--out", out,
                                      "--preset", "tiny", "--device", "cpu", "--no-progress"],
    "stage evaluate": lambda d, out: ["stage", "evaluate", "--checkpoint", out / "none.pt",
                                      "--data", d["manifest"], "--out", out, "--no-progress"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_broken_coco_file_is_one_line_naming_file_and_problem(tiny_coco, tmp_path, case, command):
    mutate, message = COCO_CASES[case]
    coco = copy.deepcopy(tiny_coco["coco"])
    mutate(coco)
    tiny_coco["annotations"].write_text(json.dumps(coco))
    line = bad_input(COMMANDS[command](tiny_coco, tmp_path / "out"))
    assert line.startswith(f"error: {tiny_coco['annotations']}: {message}")
    assert not (tmp_path / "out" / "stage.json").exists()


# --------------------------------------------------------------------------- manifests

MANIFEST_CASES: dict[str, tuple[str, str]] = {
    "missing images": ("format_version: 1\nname: tiny\nannotations: instances_train.json\n",
                       "images"),
    "missing images.root": ("name: tiny\nimages: {glob: '*.png'}\n", "images.root"),
    "missing name": ("images: {root: images, glob: '*.png'}\n", "name"),
    "another format version": ("format_version: 7\nname: t\nimages: {root: images, glob: '*.png'}\n",
                               "format_version: 7 is not supported"),
    "not a mapping": ("- just\n- a list\n", "a manifest must be a YAML mapping"),
}


@pytest.mark.parametrize("command", ["data check", "stage finetune", "stage evaluate"])
@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_broken_manifest_is_one_line_naming_file_and_field(tiny_coco, tmp_path, case, command):
    text, message = MANIFEST_CASES[case]
    tiny_coco["manifest"].write_text(text)
    line = bad_input(COMMANDS[command](tiny_coco, tmp_path / "out"))
    assert line.startswith(f"error: {tiny_coco['manifest']}: ")
    assert message in line


# --------------------------------------------------------------------------- pretrain --shards

@pytest.fixture(scope="module")
def proposals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_shards")
    write_synth_dataset(root / "data", seed=1, num_unlabeled=2, num_train=1, num_val=1,
                        image_size=64, progress=False)
    run_propose(ProposeConfig(images=root / "data" / "unlabeled.yaml", out=root / "propose",
                              num_workers=0, shard_size=1), progress=False)
    return root / "propose"


def _other_format_version(shard: Path) -> str:
    table = pq.read_table(shard)
    meta = dict(table.schema.metadata)
    meta[META_KEY] = json.dumps({**json.loads(meta[META_KEY]), "format_version": 99}).encode()
    pq.write_table(table.replace_schema_metadata(meta), shard)
    return "shard format_version 99 is not supported (this uplvp reads 1)"


def _truncated(shard: Path) -> str:
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return "not a readable Parquet file"


def _not_parquet(shard: Path) -> str:
    shard.write_text("hello")
    return "not a readable Parquet file"


@pytest.mark.parametrize("kind", ["images", "masks"])
@pytest.mark.parametrize("damage", [_other_format_version, _truncated, _not_parquet],
                         ids=["other format version", "truncated", "not parquet"])
def test_pretrain_refuses_a_damaged_shard_with_one_line(proposals, tmp_path, kind, damage):
    shards = tmp_path / "propose"
    shutil.copytree(proposals, shards)
    shard = shards / kind / "shard-00001.parquet"
    message = damage(shard)
    line = bad_input(["stage", "pretrain", "--shards", shards, "--out", tmp_path / "run",
                      "--preset", "tiny", "--device", "cpu", "--num-workers", "0",
                      "--no-progress"])
    assert line.startswith(f"error: {shard}: {message}")
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- finetune --init

def _random_bytes(path: Path) -> str:
    path.write_bytes(bytes(range(256)) * 4)
    return "not a checkpoint (not a file written by torch.save)"


def _json_file(path: Path) -> str:
    path.write_text('{"model": {}}')
    return "not a checkpoint (not a file written by torch.save)"


def _model_only_checkpoint(path: Path) -> str:
    torch.save({"format_version": 1, "model": {"w": torch.zeros(2)}}, path)
    return "not a training checkpoint (missing training_format_version"


def _other_checkpoint_version(path: Path) -> str:
    torch.save({"format_version": 3, "model": {"w": torch.zeros(2)}}, path)
    return "format_version 3 is not 1"


def _tensor_not_dict(path: Path) -> str:
    torch.save(torch.zeros(3), path)
    return "not a uplvp checkpoint (no 'model' state dict)"


@pytest.mark.parametrize("make", [_random_bytes, _json_file, _model_only_checkpoint,
                                  _other_checkpoint_version, _tensor_not_dict],
                         ids=["random bytes", "json", "model-only", "other version", "tensor"])
def test_finetune_init_that_is_not_a_checkpoint_is_one_line(tiny_coco, tmp_path, make):
    init = tmp_path / "init.pt"
    message = make(init)
    line = bad_input(["stage", "finetune", "--train", tiny_coco["manifest"], "--init", init,
                      "--out", tmp_path / "run", "--preset", "tiny", "--device", "cpu",
                      "--no-progress"])
    assert line.startswith(f"error: {init}: {message}")


def test_finetune_init_folder_without_checkpoints_is_one_line(tiny_coco, tmp_path):
    line = bad_input(["stage", "finetune", "--train", tiny_coco["manifest"], "--init", tmp_path,
                      "--out", tmp_path / "run", "--preset", "tiny", "--no-progress"])
    assert line == f"error: {tmp_path}: no checkpoints/latest in this pretrain run folder"
