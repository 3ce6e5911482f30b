"""pretrain -> finetune -> evaluate -> predict -> inspect run through the CLI on tiny data."""
import json
import shutil
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from typer.testing import CliRunner

from pipeline.synth import write_synth_dataset
from stages.cli import app
from stages.propose import ProposeConfig, run_propose

runner = CliRunner()

TRAIN_YAML = """
model: {preset: tiny}
data: {batch_size: 2, short_side: [64, 64], max_long_side: 96, eval_short_side: 64, num_workers: 0}
train: {max_steps: 6, warmup_steps: 1, log_every: 1, checkpoint_every: 3, keep_last: 5, lr: 0.001, eval_every: 3}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_synth_dataset(root / "data", seed=2, num_unlabeled=6, num_train=4, num_val=3,
                        image_size=64, progress=False)
    run_propose(ProposeConfig(images=root / "data" / "unlabeled.yaml", out=root / "propose",
                              num_workers=0, shard_size=3), progress=False)
    (root / "train.yaml").write_text(TRAIN_YAML)
    (root / "pretrain.yaml").write_text(TRAIN_YAML.replace(", eval_every: 3", "")
                                        + "loss: {num_points: null}\nmasks: {min_score: 0.0}\n")
    return root


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def pretrained(world):
    out = world / "pretrain"
    invoke("stage", "pretrain", "--shards", world / "propose", "--out", out,
           "--config", world / "pretrain.yaml", "--no-progress")
    return out


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def test_pretrain_writes_checkpoints_metrics_and_record(pretrained):
    assert (pretrained / "checkpoints" / "latest").read_text().strip() == "step-0000006.pt"
    assert sorted(losses(pretrained)) == [1, 2, 3, 4, 5, 6]
    record = json.loads((pretrained / "stage.json").read_text())
    assert record["stage"] == "pretrain" and record["counts"]["step"] == 6


@pytest.fixture(scope="module")
def finetuned(world, pretrained):
    runs = {}
    for arm, init in (("pretrained", pretrained), ("scratch", "none")):
        out = world / f"ft_{arm}"
        result = invoke("stage", "finetune", "--train", world / "data" / "train.yaml",
                        "--val", world / "data" / "val.yaml", "--init", init, "--out", out,
                        "--config", world / "train.yaml", "--no-progress")
        runs[arm] = (out, result.output)
    return runs


def test_finetune_from_pretrained_skips_only_the_class_head(finetuned):
    out, output = finetuned["pretrained"]
    flat = " ".join(output.split())
    assert "skipped (shape mismatch) " in flat and "missing 0" in flat
    record = json.loads((out / "stage.json").read_text())
    assert record["counts"]["init"]["skipped"] and all(
        "class" in key for key in record["counts"]["init"]["skipped"])
    assert (out / "checkpoints" / "best.pt").is_file()
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6] and all("val/segm_AP" in e for e in evals)


def test_scratch_and_pretrained_differ_only_in_init(finetuned):
    a = json.loads((finetuned["pretrained"][0] / "stage.json").read_text())["config"]
    b = json.loads((finetuned["scratch"][0] / "stage.json").read_text())["config"]
    assert {k for k in a if a[k] != b[k]} == {"init", "out"}


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(world, finetuned, tmp_path):
    full = finetuned["scratch"][0]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "step-0000006.pt").unlink()
    (cut / "checkpoints" / "latest").write_text("step-0000003.pt\n")  # as if killed after step 3
    invoke("stage", "finetune", "--train", world / "data" / "train.yaml", "--val",
           world / "data" / "val.yaml", "--init", "none", "--out", cut,
           "--config", world / "train.yaml", "--resume", "--no-progress")
    resumed, original = losses(cut), losses(full)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(original[step], rel=1e-5, abs=1e-6)


def test_evaluate_predict_and_inspect_run(world, finetuned):
    run = finetuned["pretrained"][0]
    ev = world / "eval"
    invoke("stage", "evaluate", "--checkpoint", run, "--data", world / "data" / "val.yaml",
           "--out", ev, "--short-side", "64", "--no-progress")
    metrics = json.loads((ev / "metrics.json").read_text())
    assert set(metrics["segm"]) >= {"AP", "AP50", "AP75"}
    predictions = json.loads((ev / "predictions.json").read_text())
    if predictions:
        COCO(str(world / "data" / "val" / "annotations.json")).loadRes(str(ev / "predictions.json"))
    pred = world / "pred"
    invoke("predict", "--checkpoint", run / "checkpoints" / "best.pt", "--images",
           world / "data" / "val" / "images", "--out", pred, "--score-threshold", "0",
           "--overlays", "--short-side", "64", "--no-progress")
    assert len(list((pred / "overlays").glob("*.png"))) == 3
    result = invoke("inspect", "run", run, "--out", world / "curves.png")
    assert (world / "curves.png").stat().st_size > 1000 and "wrote" in result.output


def test_finetune_bad_init_is_one_line(world, tmp_path):
    result = runner.invoke(app, ["stage", "finetune", "--train", str(world / "data" / "train.yaml"),
                                 "--init", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o"),
                                 "--config", str(world / "train.yaml"), "--no-progress"])
    assert result.exit_code == 2 and "checkpoint not found" in result.output


def test_finetune_init_skip_keeps_named_tensors_fresh(world, pretrained, tmp_path):
    config = tmp_path / "skip.yaml"
    config.write_text((world / "train.yaml").read_text() + "init_skip: [cls_fcs]\n")
    out = tmp_path / "ft"
    invoke("stage", "finetune", "--train", world / "data" / "train.yaml", "--init", pretrained,
           "--out", out, "--config", config, "--no-progress")
    init = json.loads((out / "stage.json").read_text())["counts"]["init"]
    assert init["reinitialised"] and all("cls_fcs" in k for k in init["reinitialised"])
    assert not set(init["reinitialised"]) & set(init["skipped"])


def _evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k.startswith("val/")}
            for r in map(json.loads, lines) if r["kind"] == "eval"]


def test_persistent_loader_workers_train_and_validate_like_one_process(world, pretrained,
                                                                        finetuned, tmp_path):
    # 2 persistent workers, compact masks: pretrain runs 2 epochs of 3 batches, finetune 3
    # epochs of 2 batches plus 2 validations; losses and metrics equal the 0-worker runs
    out = tmp_path / "pretrain_workers"
    invoke("stage", "pretrain", "--shards", world / "propose", "--out", out,
           "--config", world / "pretrain.yaml", "--num-workers", 2, "--no-progress")
    assert losses(out) == losses(pretrained)
    out = tmp_path / "ft_workers"
    invoke("stage", "finetune", "--train", world / "data" / "train.yaml",
           "--val", world / "data" / "val.yaml", "--init", "none", "--out", out,
           "--config", world / "train.yaml", "--num-workers", 2, "--no-progress")
    reference = finetuned["scratch"][0]
    assert losses(out) == losses(reference)
    assert _evals(out) == _evals(reference) and len(_evals(out)) == 2
