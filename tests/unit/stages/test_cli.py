"""The `uplvp` CLI as a user runs it: help, version, error lines, exit codes."""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from stages.cli import app

runner = CliRunner()


def uplvp(*args, cwd=None):
    """Run the real console entry point in a subprocess (what users see, tracebacks included)."""
    return subprocess.run(
        [sys.executable, "-m", "stages.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "group, commands",
    [
        ([], ["stage", "data", "inspect", "predict", "demo"]),
        (["stage"], ["propose", "pretrain", "finetune", "evaluate"]),
        (["data"], ["synth", "split", "convert", "check"]),
        (["data", "convert"], ["cityscapes", "ctw1500"]),
        (["inspect"], ["masks", "overlay", "run"]),
    ],
)
def test_every_command_is_registered(group, commands):
    result = runner.invoke(app, [*group, "--help"])
    assert result.exit_code == 0
    listed = {line.split()[1] for line in result.output.splitlines()
              if line.startswith("│ ") and len(line.split()) > 2}
    assert set(commands) <= listed, listed


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("uplvp 0.")
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("stage", "data", "inspect", "demo", "predict"):
        assert command in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "masks", "nowhere"], "nowhere"),
        (["inspect", "overlay", "nowhere", "--image-id", "1", "--out", "x.png"], "nowhere"),
        (["stage", "evaluate", "--checkpoint", "nope.pt", "--data", "x.yaml", "--out", "o"], "x.yaml: manifest file not found"),
        (["stage", "pretrain", "--shards", "nowhere", "--out", "o"], "nowhere"),
    ],
)
def test_stage_commands_on_missing_inputs_are_one_line_errors(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and message in " ".join(result.output.split())


def test_bad_manifest_is_one_line_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nimages: {root: nowhere, glob: '*.png'}\n")
    proc = uplvp("data", "check", bad)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {bad}: images.root: folder not found: {tmp_path / 'nowhere'}"]


def test_bad_coco_file_in_split_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "instances.json"
    bad.write_text(json.dumps({"images": [], "annotations": {}}))
    proc = uplvp("data", "split", "--annotations", bad, "--percent", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {bad}: not a COCO instances file (missing 'categories')"


def test_split_through_cli_writes_json_and_manifests(tiny_coco):
    out = tiny_coco["dir"] / "splits"
    result = runner.invoke(
        app,
        ["data", "split", "--manifest", tiny_coco["manifest"], "--percent", "10", "50",
         "--seed", "1", "--seed", "2", "--out", out],
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert "instances_train.1@10.json" in names and "instances_train.2@50.yaml" in names
    assert "instances_train.split.json" in names
    half = json.loads((out / "instances_train.1@50.json").read_text())
    assert len(half["images"]) == 5
    # the written manifest loads and points at the original images
    check = runner.invoke(app, ["data", "check", str(out / "instances_train.1@50.yaml")])
    assert check.exit_code == 0, check.output


def test_split_percent_not_a_number(tiny_coco):
    result = runner.invoke(
        app, ["data", "split", "--annotations", tiny_coco["annotations"], "--percent", "ten"]
    )
    assert result.exit_code == 2 and "--percent: 'ten' is not a number" in result.output


def test_config_file_and_cli_override_and_unknown_key(tiny_coco, tmp_path):
    cfg = tmp_path / "split.yaml"
    cfg.write_text(f"annotations: {tiny_coco['annotations']}\npercent: [20]\nseed: [3]\n")
    out = tmp_path / "o"
    result = runner.invoke(app, ["data", "split", "--config", cfg, "--seed", "4", "--out", out])
    assert result.exit_code == 0, result.output
    assert (out / "instances_train.4@20.json").is_file()  # CLI seed overrides the file's
    record = json.loads((out / "instances_train.split.json").read_text())
    assert record["config"]["seed"] == [4] and record["config"]["percent"] == [20.0]

    cfg.write_text("percnt: [20]\n")
    result = runner.invoke(app, ["data", "split", "--config", cfg])
    assert result.exit_code == 2 and "config: percnt: unknown field" in result.output
