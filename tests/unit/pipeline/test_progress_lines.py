"""Progress where stderr is not a terminal (| tee, Slurm, CI): plain lines at a steady rhythm."""
import io
import os
import re
import subprocess
import sys

from rich.console import Console

from pipeline.synth import write_synth_dataset
from pipeline.engine.progress import LoopProgress, format_duration, line_every
from pipeline.engine.metrics import RunLogger
from tests.helpers import REPO



def piped_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200), buffer


def test_format_duration_and_rhythm():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(None) == "-"
    assert format_duration(float("nan")) == "-"
    assert line_every(6) == 1 and line_every(100) == 5 and line_every(101) == 6


def test_loop_progress_prints_about_twenty_lines_then_the_last():
    console, buffer = piped_console()
    assert not console.is_terminal
    with LoopProgress("propose", 45, "shards", console=console, rate_unit="images",
                      min_seconds=0) as report:
        for _ in range(45):
            report.advance(1, secondary=10)
    lines = buffer.getvalue().splitlines()
    done = [int(re.match(r"propose: (\d+)/45 shards", line).group(1)) for line in lines]
    assert done == [3 * k for k in range(1, 16)]  # every 3 = ceil(45 / 20); 45 is the last
    assert re.fullmatch(r"propose: 45/45 shards \(100%\), 450 images, [\d.]+ images/s, "
                        r"elapsed \d:\d\d:\d\d, ETA 0:00:00", lines[-1])


def test_loop_progress_spaces_lines_in_time(monkeypatch):
    clock = iter(float(t) for t in range(100))  # one second per call of perf_counter
    monkeypatch.setattr("pipeline.engine.progress.time.perf_counter", lambda: next(clock))
    console, buffer = piped_console()
    with LoopProgress("evaluate", 40, "batches", console=console, min_seconds=5) as report:
        for _ in range(40):
            report.advance()
    done = [int(line.split()[1].split("/")[0]) for line in buffer.getvalue().splitlines()]
    # every 2 batches by count; the first line at once, then >= 5 s apart, and the last
    assert done == [2, 8, 14, 20, 26, 32, 38, 40]


def test_loop_progress_off_prints_nothing():
    console, buffer = piped_console()
    with LoopProgress("predict", 4, "batches", console=console, mode="off") as report:
        for _ in range(4):
            report.advance()
    assert buffer.getvalue() == ""


def test_run_logger_plain_lines(tmp_path):
    console, buffer = piped_console()
    logger = RunLogger(tmp_path, enabled=True, total_steps=600, start_step=100, progress=True,
                       tensorboard=False, console=console, label="finetune")
    logger.log({"kind": "train", "step": 150, "epoch": 3, "lr": 5e-4, "loss": 21.6,
                "loss_ce": 3.2251, "loss_ce_aux0": 4.0, "loss_dice": 1.3234, "grad_norm": 2.0,
                "step_seconds": 0.1712, "data_wait_share": 0.06, "seconds": 10.0})
    logger.log({"kind": "eval", "step": 150, "val/segm_AP": 0.0154, "val/segm_AP50": 0.05,
                "val/bbox_AP": 0.02})
    logger.log({"kind": "nonfinite", "step": 150})
    logger.close()
    assert buffer.getvalue().splitlines() == [
        # ETA: 10 s for the 50 steps of this process, 450 steps left
        "finetune step 150/600: loss 21.6 (ce 3.225 dice 1.323), lr 5.00e-04, 0.171 s/step, "
        "data 6%, ETA 0:01:30",
        "finetune eval step 150/600: segm_AP 0.0154, segm_AP50 0.0500",
    ]


def test_piped_propose_and_pretrain_print_progress_lines(tmp_path):
    """The real CLI with stderr piped, as under Slurm: no bar, a line per rhythm step."""
    write_synth_dataset(tmp_path / "data", seed=3, num_unlabeled=4, num_train=1, num_val=1,
                        image_size=64, progress=False)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TERM": "dumb"}
    env.pop("FORCE_COLOR", None)
    env.pop("TTY_COMPATIBLE", None)
    uplvp = [sys.executable, "-c", "from stages.cli import main; main()"]

    def run(*args):
        done = subprocess.run(uplvp + [str(a) for a in args], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr.splitlines()

    lines = run("stage", "propose", "--images", tmp_path / "data" / "unlabeled.yaml",
                "--out", tmp_path / "propose", "--shard-size", 2, "--num-workers", 0)
    shard_lines = [line for line in lines if line.startswith("propose: ") and "shards (" in line]
    assert [line.split()[1] for line in shard_lines] == ["1/2", "2/2"]
    assert re.search(r"2/2 shards \(100%\), 4 images, [\d.]+ images/s", shard_lines[-1])

    config = tmp_path / "pretrain.yaml"
    config.write_text(
        "model: {preset: tiny}\nloss: {num_points: null}\nmasks: {min_score: 0.0}\n"
        "data: {batch_size: 2, short_side: [64, 64], max_long_side: 96, num_workers: 0}\n"
        "train: {max_steps: 6, warmup_steps: 1, log_every: 2, tensorboard: false}\n")
    lines = run("stage", "pretrain", "--shards", tmp_path / "propose",
                "--out", tmp_path / "pretrain", "--config", config)
    step_lines = [line for line in lines if line.startswith("pretrain step ")]
    assert [line.split()[2] for line in step_lines] == ["2/6:", "4/6:", "6/6:"]
    pattern = (r"pretrain step \d/6: loss [\d.e+-]+ \(.*dice [\d.e+-]+.*focal [\d.e+-]+.*\), "
               r"lr [\d.e+-]+, [\d.]+ s/step, data \d+%, ETA \d:\d\d:\d\d")
    assert all(re.fullmatch(pattern, line) for line in step_lines), step_lines
    assert not any("━" in line for line in lines)  # no bar drawn into the log
