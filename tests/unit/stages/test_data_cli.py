"""`uplvp data synth|convert` through the CLI on tiny data."""
import json

from pycocotools.coco import COCO
from typer.testing import CliRunner

from stages.cli import app
from tests.helpers.converters import make_cityscapes, make_ctw

runner = CliRunner()


def test_data_synth_cli_writes_loadable_dataset_and_record(tmp_path):
    out = tmp_path / "synth"
    result = runner.invoke(
        app,
        ["data", "synth", "--out", str(out), "--seed", "3", "--num-unlabeled", "2",
         "--num-train", "2", "--num-val", "1", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "stage.json").read_text())
    assert record["stage"] == "data synth" and record["config"]["seed"] == 3
    assert len(record["config_hash"]) == 16
    coco = COCO(str(out / "train" / "annotations.json"))
    assert len(coco.getImgIds()) == 2
    for split in ("unlabeled", "train", "val"):
        check = runner.invoke(app, ["data", "check", str(out / f"{split}.yaml")])
        assert check.exit_code == 0, check.output


def test_data_synth_cli_rejects_empty_split(tmp_path):
    result = runner.invoke(
        app, ["data", "synth", "--out", str(tmp_path / "s"), "--num-train", "0", "--no-progress"]
    )
    assert result.exit_code == 2 and "--num-train must be >= 1" in result.output


def test_convert_cityscapes_cli(tmp_path):
    make_cityscapes(tmp_path / "cs")
    out = tmp_path / "cs.json"
    result = runner.invoke(
        app,
        ["data", "convert", "cityscapes", "--root", str(tmp_path / "cs"), "--split", "train",
         "--out", str(out), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    coco = COCO(str(out))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds()))[:2] == ["bicycle", "bus"]
    assert len(coco.getAnnIds()) > 0


def test_convert_ctw1500_cli_and_missing_folder(tmp_path):
    images, labels = make_ctw(tmp_path / "ctw")
    out = tmp_path / "ctw.json"
    result = runner.invoke(
        app,
        ["data", "convert", "ctw1500", "--images", str(images), "--labels", str(labels),
         "--out", str(out), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert COCO(str(out)).loadCats([1])[0]["name"] == "text"
    bad = runner.invoke(
        app,
        ["data", "convert", "ctw1500", "--images", str(tmp_path / "nope"), "--labels",
         str(labels), "--out", str(out), "--no-progress"],
    )
    assert bad.exit_code == 2 and "error:" in bad.output and "nope" in bad.output
