"""The CLIP text loss of pre-training: criterion, the cached text embeddings, end to end.

propose (tiny random CLIP, asked for explicitly) -> pretrain with ``loss.text`` -> finetune runs
through the CLI; the unit tests pin the loss value, that training the projection lowers it,
that the projection is a parameter of the trained module, and the text-embeddings contract.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pipeline.errors import InputError
from pipeline.shard_dataset import find_shards
from pipeline.synth import write_synth_dataset
from pipeline.text_embeddings import check_shard_labels, read_text_embeddings
from stages.cli import app
from stages.propose import ProposeConfig, run_propose
from uplvp_model.checkpoint import read_checkpoint
from uplvp_model.criterion import PretrainCriterion
from uplvp_model.pretraining import PromptedModel
from uplvp_model.proposal.text import save_cache_file
from tests.helpers import ASSETS

runner = CliRunner()


def _outputs_and_targets(seed: int = 0):
    """One image, 4 kernels of dim 8, 3 pseudo masks of 8 x 8 whose kernels predict them
    exactly (so the matcher pairs kernel i with mask i), vocabulary of 5 names in 6-d."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4], masks[1, 4:, :4], masks[2, 4:, 4:] = True, True, True
    pred_masks = torch.full((1, 4, 8, 8), -8.0)
    pred_masks[0, :3][masks] = 8.0
    logits = torch.tensor([[[4.0, -4.0]] * 3 + [[-4.0, 4.0]]])
    outputs = {"pred_logits": logits, "pred_masks": pred_masks,
               "kernels": torch.randn(1, 4, 8, generator=g), "aux_outputs": []}
    targets = [{"labels": torch.zeros(3, dtype=torch.long), "masks": masks,
                "label_index": torch.tensor([4, 0, 2]),
                "text_embeddings": F.normalize(torch.randn(5, 6, generator=g), dim=1)}]
    return outputs, targets


def _criterion() -> PretrainCriterion:
    torch.manual_seed(0)
    return PretrainCriterion(embedding_weight=0.0, text_weight=1.0, kernel_dim=8, text_dim=6,
                             num_points=None)


def test_text_term_equals_clip_cross_entropy_of_the_matched_kernels():
    criterion = _criterion()
    outputs, targets = _outputs_and_targets()
    losses = criterion(outputs, targets)
    projected = F.normalize(criterion.text_projection(outputs["kernels"][0, :3]), dim=1)
    logits = projected @ targets[0]["text_embeddings"].T / 0.07
    expected = F.cross_entropy(logits, targets[0]["label_index"])
    torch.testing.assert_close(losses["loss_text"], expected)


def test_training_the_projection_lowers_the_text_loss():
    criterion = _criterion()
    outputs, targets = _outputs_and_targets()
    optimizer = torch.optim.SGD(criterion.text_projection.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = criterion(outputs, targets)["loss_text"]
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = float(criterion(outputs, targets)["loss_text"])
    assert first > 0.5 and last < 0.1 * first, (first, last)


def test_the_projection_is_a_parameter_of_the_trained_module():
    from uplvp_model.config import model_config
    from uplvp_model.model import build_model
    from uplvp_model.prompts import PromptEncoder

    cfg = model_config("tiny", num_classes=1)
    criterion = PretrainCriterion(text_weight=1.0, kernel_dim=cfg.hidden_dim, text_dim=6)
    prompted = PromptedModel(build_model(cfg), PromptEncoder(cfg.hidden_dim, None, 8, use_embedding=False),
                             text_projection=criterion.text_projection)
    trained = {id(p) for p in prompted.parameters()}
    assert all(id(p) in trained for p in criterion.text_projection.parameters())
    assert {"text_projection.weight", "text_projection.bias"} <= set(prompted.state_dict())


def test_text_embeddings_file_round_trip_and_one_line_errors(tmp_path):
    names = ["circle", "square", "sky"]
    embeddings = F.normalize(torch.randn(3, 4), dim=1)
    save_cache_file(tmp_path / "text_embeddings.pt", ("m|ck", tuple(names), ("{}",)), embeddings)
    read = read_text_embeddings(tmp_path)
    assert read.names == names and read.model_key == "m|ck"
    assert torch.equal(read.embeddings, embeddings)
    with pytest.raises(InputError, match="no text embeddings next to the shards"):
        read_text_embeddings(tmp_path / "elsewhere")
    torch.save({"format_version": 1, "vocabulary": names, "embeddings": torch.zeros(2, 4)},
               tmp_path / "text_embeddings.pt")
    with pytest.raises(InputError, match=r"'embeddings' must be float \[3, E\], got \(2, 4\)"):
        read_text_embeddings(tmp_path)
    (tmp_path / "text_embeddings.pt").write_text("not a torch file")
    with pytest.raises(InputError, match="not a readable text-embeddings file") as err:
        read_text_embeddings(tmp_path)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic images, clip shards from a tiny random CLIP (low thresholds: random weights
    give masks of no meaning, only rows to train on), and the stage configs."""
    root = tmp_path_factory.mktemp("text_loss")
    write_synth_dataset(root / "data", seed=3, num_unlabeled=6, num_train=4, num_val=2,
                        image_size=64, progress=False)
    (root / "vocabulary.txt").write_text("circle\nsquare\n")
    (root / "propose.yaml").write_text(
        "options: {temperature: 0.001, min_peak: 0.01, threshold: 0.01, "
        "max_area_fraction: 1.0, input_size: 64}\n")
    result = runner.invoke(app, [
        "stage", "propose", "--images", str(root / "data" / "unlabeled.yaml"),
        "--out", str(root / "propose"), "--proposer", "clip", "--clip-model",
        str(ASSETS / "tiny-clip-vit.json"), "--random-weights", "--vocabulary",
        str(root / "vocabulary.txt"), "--config", str(root / "propose.yaml"),
        "--num-workers", "0", "--shard-size", "3", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    # classical shards for the pooling test: irregular masks (the random CLIP's fill the image,
    # where mask and box pooling coincide)
    run_propose(ProposeConfig(images=root / "data" / "unlabeled.yaml", out=root / "classical",
                              num_workers=0, shard_size=3), progress=False)
    base = ("model: {preset: tiny}\n"
            "data: {batch_size: 2, short_side: [64, 64], max_long_side: 96, "
            "eval_short_side: 64, num_workers: 0}\n"
            "train: {max_steps: 4, warmup_steps: 1, log_every: 1, checkpoint_every: 1, "
            "keep_last: 5, lr: 0.01}\n")
    (root / "finetune.yaml").write_text(base)
    base += "masks: {min_score: 0.0, min_area: 1}\n"
    (root / "text.yaml").write_text(base + "loss: {num_points: null, text: 1.0}\n")
    (root / "mask_pool.yaml").write_text(base + "loss: {num_points: null}\n"
                                         "prompt: {pool: mask}\n")
    (root / "box_pool.yaml").write_text(base + "loss: {num_points: null}\n")
    return root


def _pretrain(world: Path, name: str, out: Path, shards: str = "propose"):
    return runner.invoke(app, ["stage", "pretrain", "--shards", str(world / shards),
                               "--out", str(out), "--config", str(world / f"{name}.yaml"),
                               "--no-progress"])


def _train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_propose_pretrain_with_text_loss_finetune(world, tmp_path):
    read = read_text_embeddings(world / "propose")
    assert read.names[:2] == ["circle", "square"] and read.embeddings.shape[1] == 32
    masks = [s.masks for s in find_shards(world / "propose")]
    check_shard_labels(read, world / "propose", masks)  # the file belongs to these shards
    out = tmp_path / "pretrain"
    result = _pretrain(world, "text", out)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "made by RANDOM weights" in flat and f"text loss: weight 1.0, {len(read.names)} names" in flat
    records = _train_records(out)
    assert len(records) == 4 and all(r["loss_text"] > 0 for r in records)
    record = json.loads((out / "stage.json").read_text())
    assert record["inputs"]["proposal_weights"]["kind"] == "random"
    # the trainer optimised the projection: its weights moved between steps 1 and 4
    first = read_checkpoint(out / "checkpoints" / "step-0000001.pt")["model"]
    last = read_checkpoint(out / "checkpoints" / "step-0000004.pt")["model"]
    assert not torch.equal(first["text_projection.weight"], last["text_projection.weight"])
    finetuned = runner.invoke(app, [
        "stage", "finetune", "--train", str(world / "data" / "train.yaml"), "--init", str(out),
        "--out", str(tmp_path / "finetune"), "--config", str(world / "finetune.yaml"), "--max-steps", "2",
        "--no-progress"])
    assert finetuned.exit_code == 0, finetuned.output


def test_text_loss_refuses_shards_without_text_embeddings(world, tmp_path):
    shards = tmp_path / "shards"
    import shutil

    shutil.copytree(world / "propose", shards)
    (shards / "text_embeddings.pt").unlink()
    result = runner.invoke(app, ["stage", "pretrain", "--shards", str(shards), "--out",
                                 str(tmp_path / "out"), "--config", str(world / "text.yaml"),
                                 "--no-progress"])
    assert result.exit_code == 2 and "no text embeddings next to the shards" in result.output


def test_mask_pooling_is_reachable_from_the_stage(world, tmp_path):
    box, mask = tmp_path / "box", tmp_path / "mask"
    for name, out in (("box_pool", box), ("mask_pool", mask)):
        result = _pretrain(world, name, out, shards="classical")
        assert result.exit_code == 0, result.output
    # same seed, same batches: only the prompts' pooling region differs, so the losses do
    assert _train_records(box)[0]["loss"] != _train_records(mask)[0]["loss"]
    config = json.loads((mask / "stage.json").read_text())["config"]
    assert config["prompt"]["pool"] == "mask"
