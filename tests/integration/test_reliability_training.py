"""Training-side reliability (docs/reliability.md): SIGKILL then ``--resume`` replays the
uninterrupted loss curve, a kill mid-checkpoint-write never leaves a partial file under a
checkpoint name, ``latest`` always names a loadable checkpoint, and non-finite losses never step
the optimizer nor reach a checkpoint (``--on-nan skip|stop``).

Faults come from the documented test hook ``UPLVP_TRAIN_FAULT`` (pipeline/engine/faults.py) so each kill
lands at a known point; the kills themselves are real SIGKILLs of a ``stages.cli`` subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.synth import write_synth_dataset
from stages.cli import app
from stages.propose import ProposeConfig, run_propose
from pipeline.engine.checkpoint import latest_checkpoint, list_checkpoints, load_training_checkpoint
from pipeline.engine import FAULT_ENV, TrainFaults
from tests.helpers import REPO

STEPS = [1, 2, 3, 4, 5, 6]
TRAIN_YAML = """
model: {preset: tiny}
data: {batch_size: 2, short_side: [64, 64], max_long_side: 64, num_workers: 0}
train: {max_steps: 6, warmup_steps: 1, log_every: 1, checkpoint_every: 2, keep_last: 5, lr: 0.001,
        progress: false, tensorboard: false}
loss: {num_points: null}
masks: {min_score: 0.0}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability_training")
    write_synth_dataset(root / "data", seed=3, num_unlabeled=4, num_train=4, num_val=2,
                        image_size=64, progress=False)
    run_propose(ProposeConfig(images=root / "data" / "unlabeled.yaml", out=root / "propose",
                              num_workers=0, shard_size=2), progress=False)
    (root / "pretrain.yaml").write_text(TRAIN_YAML)
    (root / "finetune.yaml").write_text(TRAIN_YAML.replace("masks: {min_score: 0.0}\n", "")
                                        .replace("loss: {num_points: null}\n", "num_points: null\n"))
    return root


def pretrain_args(world: Path, out: Path) -> list[str]:
    return ["stage", "pretrain", "--shards", str(world / "propose"), "--out", str(out),
            "--config", str(world / "pretrain.yaml"), "--no-progress"]


def finetune_args(world: Path, out: Path) -> list[str]:
    return ["stage", "finetune", "--train", str(world / "data" / "train.yaml"), "--init", "none",
            "--out", str(out), "--config", str(world / "finetune.yaml"), "--no-progress"]


def invoke(args: list[str], expect: int = 0):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == expect, result.output
    return result


def start(args: list[str], fault: str) -> subprocess.Popen:
    env = {**os.environ, FAULT_ENV: fault, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "stages.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before the awaited state:\n"
                        f"{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("awaited state did not appear in time")
        time.sleep(0.05)


def records(run: Path, kind: str) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["kind"] == kind]


def train_losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every ``train`` line, in file order (duplicates kept)."""
    return [(r["step"], r["loss"]) for r in records(run, "train")]


def assert_same_curve(resumed: Path, reference: Path) -> None:
    got, want = train_losses(resumed), train_losses(reference)
    assert [s for s, _ in got] == STEPS == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def assert_all_finite(run: Path) -> None:
    """Every tensor of every checkpoint in ``run`` is finite."""
    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                assert torch.isfinite(value).all()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    files = list_checkpoints(run / "checkpoints")
    assert files
    for path in files:
        walk(load_training_checkpoint(path))


@pytest.fixture(scope="module")
def reference_pretrain(world) -> Path:
    out = world / "pretrain_ref"
    invoke(pretrain_args(world, out))
    return out


@pytest.fixture(scope="module")
def reference_finetune(world) -> Path:
    out = world / "finetune_ref"
    invoke(finetune_args(world, out))
    return out


def test_fault_hook_is_inert_when_unset_and_rejects_typos(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert TrainFaults.from_env() == TrainFaults()
    monkeypatch.setenv(FAULT_ENV, "nan-loss=3, kill-in-save=4")
    assert TrainFaults.from_env() == TrainFaults(nan_loss_group=3, kill_in_save_step=4)
    monkeypatch.setenv(FAULT_ENV, "nan-los=3")
    with pytest.raises(ValueError, match="nan-los=3"):
        TrainFaults.from_env()


def test_pretrain_sigkilled_after_a_checkpoint_resumes_to_the_same_curve(world, reference_pretrain):
    out = world / "pretrain_killed"
    # Hang after step 5: step 4's checkpoint is on disk, step 5's metrics line is not covered by it.
    proc = start(pretrain_args(world, out), "hang-after-step=5")
    wait_until(lambda: 5 in [s for s, _ in train_losses(out)], proc)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert latest_checkpoint(out).name == "step-0000004.pt"
    assert load_training_checkpoint(latest_checkpoint(out))["step"] == 4
    assert not (out / "stage.json").exists()

    invoke([*pretrain_args(world, out), "--resume"])
    assert_same_curve(out, reference_pretrain)  # step 5's line of the killed run was replaced
    assert latest_checkpoint(out).name == "step-0000006.pt"
    final = load_training_checkpoint(latest_checkpoint(out))["model"]
    expected = load_training_checkpoint(latest_checkpoint(reference_pretrain))["model"]
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6)


def test_finetune_killed_mid_checkpoint_write_leaves_no_partial_checkpoint(world, reference_finetune):
    out = world / "finetune_killed_in_save"
    proc = start(finetune_args(world, out), "kill-in-save=4")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, output
    folder = out / "checkpoints"
    assert [p.name for p in list_checkpoints(folder)] == ["step-0000002.pt"]
    partial = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-step-0000004.pt.")]
    assert len(partial) == 1  # the half-written file exists, under a temporary name only
    assert latest_checkpoint(out).name == "step-0000002.pt"
    assert load_training_checkpoint(latest_checkpoint(out))["step"] == 2

    invoke([*finetune_args(world, out), "--resume"])
    assert_same_curve(out, reference_finetune)
    assert [p.name for p in list_checkpoints(folder)] == [
        "step-0000002.pt", "step-0000004.pt", "step-0000006.pt"]
    assert load_training_checkpoint(folder / "step-0000004.pt")["step"] == 4


def test_finetune_nan_loss_is_skipped_logged_and_never_checkpointed(world, monkeypatch):
    out = world / "finetune_nan_skip"
    monkeypatch.setenv(FAULT_ENV, "nan-loss=3")
    result = invoke([*finetune_args(world, out), "--on-nan", "skip"])
    assert "non-finite loss after step 2" in " ".join(result.output.split())
    [record] = records(out, "nonfinite")
    assert record["step"] == 2 and record["action"] == "skip" and record["reason"] == "loss"
    train_ids = {img["id"] for img in json.loads(
        (world / "data" / "train" / "annotations.json").read_text())["images"]}
    assert len(record["image_ids"]) == 2 and set(record["image_ids"]) <= train_ids
    assert [s for s, _ in train_losses(out)] == STEPS
    assert all(loss is not None for _, loss in train_losses(out))
    assert_all_finite(out)
    # 7 batch groups ran, 6 optimizer updates: the NaN group never stepped the optimizer.
    final = load_training_checkpoint(latest_checkpoint(out))
    assert final["step"] == 6 and final["scheduler"]["last_epoch"] == 6
    assert {float(s["step"]) for s in final["optimizer"]["state"].values()} == {6.0}


def test_pretrain_nan_loss_with_on_nan_stop_exits_2_with_one_line(world, monkeypatch):
    out = world / "pretrain_nan_stop"
    monkeypatch.setenv(FAULT_ENV, "nan-loss=3")
    result = invoke([*pretrain_args(world, out), "--on-nan", "stop"], expect=2)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output
    line = " ".join(result.stderr[result.stderr.index("error:"):].split())
    assert line.startswith(f"error: {out / 'metrics.jsonl'}: training stopped: non-finite loss")
    assert "on_nan=stop" in line and "images [" in line
    [record] = records(out, "nonfinite")
    assert record["action"] == "stop" and len(record["image_ids"]) == 2
    assert latest_checkpoint(out).name == "step-0000002.pt"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002.pt"]
    assert_all_finite(out)
