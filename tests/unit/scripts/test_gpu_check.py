"""benchmarks/gpu_check.py, the GPU script's measuring code, runs on a CPU at toy size."""
from __future__ import annotations

import subprocess
import sys
from tests.helpers import REPO



def test_gpu_check_prints_every_row_on_cpu():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--preset", "tiny",
         "--short-side", "64", "--long-side", "64", "--batch", "2", "--steps", "1",
         "--skip-clip", "--device", "cpu", "--decoders", "knet", "--amp", "bf16"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in ("pretrain", "finetune", "evaluate")]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("pretrain", "knet", "bf16"), ("finetune", "knet", "bf16"), ("evaluate", "knet", "off")]
    for r in rows:
        assert float(r[4]) > 0  # images/s
        if r[0] != "evaluate":
            assert abs(2 / float(r[3]) - float(r[4])) <= 0.1 + 0.01 * float(r[4])
    assert "rows: 3, failed: 0" in result.stdout
