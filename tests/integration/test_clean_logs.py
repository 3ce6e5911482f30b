"""A healthy run's piped log has no error- or warning-level line from a library.

The commands run as a user runs them (a subprocess, stdout and stderr piped as in ``| tee log``
or a Slurm log): ``stage propose`` on 1 and on 2 Ray actors (each starts its own local Ray) and
a toy-budget ``demo`` (clip proposer on the shipped model, 2 Ray actors). Every line is checked
against the level markers of the loggers such a run goes through: glog/spdlog of Ray's C++
core (``[date time E pid tid] file.cc:N:``), absl (``E1206 ...``), Python's logging in its
default and Ray's formats, Python warnings, and tracebacks.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import REPO

pytest.importorskip("ray")

LIBRARY_LEVEL_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [EWF] \d+ \d+\]"  # Ray C++ (spdlog): [2026-12-06 04:15:13,054 E 1 1]
    r"|^[EWF]\d{4} \d\d:\d\d:\d\d"  # absl / glog: E1206 04:15:13.054
    r"|^(ERROR|WARNING|CRITICAL|FATAL)[: ]"  # logging.basicConfig's default format
    r"|\s(ERROR|WARNING|CRITICAL|FATAL)\s+\S+\.py:\d+"  # Ray's Python loggers
    r"|\b\w*Warning: "  # warnings.warn
    r"|^Traceback \(most recent call last\)"
)
UPLVP = [sys.executable, "-m", "stages.cli"]


def library_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if LIBRARY_LEVEL_LINE.search(line)]


def test_the_pattern_catches_each_kind_and_passes_our_own_lines():
    caught = [
        "[2026-12-06 04:15:13,054 E 2286 2286] core_worker.cc:2465: Actor with class name",
        "[2026-12-06 04:15:13,054 W 2286 2290] gcs_client.cc:1: slow",
        "E1206 04:15:13.054000 2286 grpc.cc:10] failed",
        "WARNING:root:something",
        "2026-12-06 04:15:13,054\tWARNING worker.py:2012 -- a warning from ray",
        "/x/y.py:3: UserWarning: deprecated",
        "Traceback (most recent call last):",
    ]
    ours = [
        "propose: proposer=clip, 6 images in 2 shards of 3; running 2 shard(s), 0 already complete",
        "pretrain step 50/1000: loss 30.2 (bce 0.2949 dice 3.775), lr 4.88e-04, ETA 0:03:37",
        "shard 1 failed: not completed: the Ray execution stopped when one shard failed",
        "─ 2. propose (clip proposer: shipped CLIP uplvp-synth-vit) ─",
    ]
    assert library_lines("\n".join(caught + ours)) == caught


def run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    result = subprocess.run(UPLVP + args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout
    return result.stdout


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    from pipeline.synth import write_synth_dataset

    root = tmp_path_factory.mktemp("clean_logs")
    write_synth_dataset(root / "data", seed=2, num_unlabeled=6, num_train=4, num_val=3,
                        image_size=64, progress=False)
    return root


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_propose_on_ray_logs_no_library_error_or_warning(pool, workers):
    out = pool / f"propose_{workers}"
    log = run(["stage", "propose", "--images", str(pool / "data" / "unlabeled.yaml"),
               "--out", str(out), "--shard-size", "3", "--num-workers", str(workers),
               "--no-progress"], cwd=REPO)
    assert "running 2 shard(s)" in " ".join(log.split()), log
    assert library_lines(log) == [], log


@pytest.mark.timeout(900)
def test_demo_logs_no_library_error_or_warning(pool):
    config = pool / "demo.yaml"
    config.write_text("num_unlabeled: 6\nnum_train: 4\nnum_val: 3\nimage_size: 64\n"
                      "pretrain_steps: 2\nfinetune_steps: 2\neval_every: 2\nbatch_size: 2\n"
                      "propose_workers: 2\n")
    log = run(["demo", "--out", str(pool / "demo"), "--config", str(config), "--no-progress"],
              cwd=REPO)
    assert "AP ratio" in log or "pretrained" in log, log
    assert library_lines(log) == [], log
