"""The training loop on a tiny MLP and synthetic batches (CPU, a few steps each).

The toys (``TinyNet``, ``synthetic_batches``, ``mse_loss``, faults) are in tests/helpers/training.py.
"""
from __future__ import annotations

import math
import re
import time

import pytest
import torch
from pydantic import ValidationError

from pipeline.errors import InputError
from tests.helpers.training import (
    Crash,
    crashing,
    global_batch,
    make_net,
    mse_loss,
    poisoned,
    quiet,
    read_metrics,
    synthetic_batches,
)
from pipeline.engine.checkpoint import latest_checkpoint, list_checkpoints, load_training_checkpoint
from pipeline.engine import (
    NonFiniteLossError,
    TrainConfig,
    batch_stream,
    lr_factor,
    move_to_device,
    train,
)
from tests.helpers import REPO

# ---------------------------------------------------------------- config and schedule


def test_lr_factor_warmup_then_cosine():
    cfg = TrainConfig(max_steps=10, warmup_steps=4, warmup_factor=0.2)
    assert lr_factor(0, cfg) == pytest.approx(0.2)
    assert lr_factor(2, cfg) == pytest.approx((0.2 + 0.8 * 0.5) * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor(4, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    assert lr_factor(5, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == pytest.approx(0.0)


def test_lr_factor_step_schedule():
    cfg = TrainConfig(max_steps=12, schedule="step", lr_steps=[8, 11], gamma=0.1)
    assert [lr_factor(s, cfg) for s in (0, 7, 8, 10, 11)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("bad", [{"lr_steps": [8, 8]}, {"lr_steps": [11, 8]}, {"lr_steps": [0]},
                                 {"max_steps": 0}, {"accumulation_steps": 0}, {"amp": "fp8"},
                                 {"unknown_field": 1}])
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        TrainConfig(**{"max_steps": 12, **bad})


def test_learning_rate_follows_the_schedule(tmp_path):
    cfg = quiet(max_steps=4, warmup_steps=2, warmup_factor=0.5, schedule="step", lr_steps=[3],
                gamma=0.5)
    train(make_net(), mse_loss, synthetic_batches(), cfg, tmp_path)
    lrs = [r["lr"] for r in read_metrics(tmp_path)]
    assert lrs == pytest.approx([1e-2 * 0.5, 1e-2 * 0.75, 1e-2, 1e-2 * 0.5])


# ---------------------------------------------------------------- data stream


def test_batch_stream_walks_epochs_and_cuts_them():
    make = lambda epoch, start: iter([(epoch, i) for i in range(start, 3)])
    stream = batch_stream(make, 0, 1, None)
    assert [next(stream)[:2] for _ in range(5)] == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    stream = batch_stream(make, 2, 0, 2)
    assert [next(stream)[2] for _ in range(4)] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    # resuming exactly at the end of an epoch moves on to the next one
    assert next(batch_stream(make, 0, 3, None))[:2] == (1, 0)
    assert next(batch_stream(make, 0, 2, 2))[:2] == (1, 0)


def test_batch_stream_closes_cut_epochs_and_rejects_empty_ones():
    closed = []

    def make(epoch, start):
        try:
            yield from range(start, 10)
        finally:
            closed.append(epoch)

    stream = batch_stream(make, 0, 0, 2)
    [next(stream) for _ in range(3)]
    assert closed == [0]
    with pytest.raises(ValueError, match=r"make_batches\(0, 0\) yielded no batches"):
        next(batch_stream(lambda e, s: iter([]), 0, 0, None))


def test_move_to_device_keeps_structure():
    batch = {"a": torch.ones(2), "b": [{"c": torch.zeros(1)}], "ids": [1, 2], "s": (torch.ones(1), 3)}
    moved = move_to_device(batch, torch.device("cpu"))
    assert moved["ids"] == [1, 2] and isinstance(moved["s"], tuple) and moved["s"][1] == 3
    assert torch.equal(moved["b"][0]["c"], torch.zeros(1))


# ---------------------------------------------------------------- training and resume


def test_training_reduces_the_loss_and_is_deterministic(tmp_path):
    cfg = quiet(max_steps=30, checkpoint_every=30, log_every=10, warmup_steps=0, lr=3e-2)
    first = train(make_net(0.0), mse_loss, synthetic_batches(num_batches=8, size=8), cfg, tmp_path / "a")
    second = train(make_net(0.0), mse_loss, synthetic_batches(num_batches=8, size=8), cfg, tmp_path / "b")
    assert first.step_losses == second.step_losses
    assert first.step_losses[30] < 0.5 * first.step_losses[1]
    assert first.step == 30 and first.epoch == 3 and first.batch_in_epoch == 6
    assert first.checkpoint == tmp_path / "a" / "checkpoints" / "step-0000030.pt"


@pytest.mark.parametrize("options", [
    {},
    {"accumulation_steps": 2, "batches_per_epoch": 3},  # groups span epoch boundaries
])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, options):
    cfg = quiet(max_steps=7, checkpoint_every=2, **options)
    full_net = make_net()
    full = train(full_net, mse_loss, synthetic_batches(), cfg, tmp_path / "full")

    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        train(make_net(), crashing(mse_loss, at_step=5), synthetic_batches(), cfg, out)
    assert latest_checkpoint(out).name == "step-0000004.pt"
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG state
    resumed_net = make_net(seed=99)  # nor on the initial weights: they come from the checkpoint
    resumed = train(resumed_net, mse_loss, synthetic_batches(), cfg, out, resume=True)

    assert sorted(resumed.step_losses) == [5, 6, 7]
    for step in (5, 6, 7):
        assert resumed.step_losses[step] == pytest.approx(full.step_losses[step], rel=1e-6, abs=0)
    for a, b in zip(full_net.state_dict().values(), resumed_net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (full.step, full.epoch, full.batch_in_epoch)
    # metrics read as one run: the crashed run's lines after step 4 were dropped
    steps = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    assert steps == list(range(1, 8))
    losses = {r["step"]: r["loss"] for r in read_metrics(out)}
    assert losses[7] == pytest.approx(full.step_losses[7], rel=1e-6)


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    cfg = quiet(max_steps=2)
    net = make_net()
    train(net, mse_loss, synthetic_batches(), cfg, tmp_path)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    again = train(net, mse_loss, synthetic_batches(), cfg, tmp_path, resume=True)
    assert again.step == 2 and again.step_losses == {}
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_fresh_run_refuses_a_directory_with_checkpoints_and_resume_without_one_starts_fresh(tmp_path):
    cfg = quiet(max_steps=2)
    fresh = train(make_net(), mse_loss, synthetic_batches(), cfg, tmp_path / "a", resume=True)
    reference = train(make_net(), mse_loss, synthetic_batches(), cfg, tmp_path / "b")
    assert fresh.step_losses == reference.step_losses
    with pytest.raises(InputError, match="already holds checkpoints"):
        train(make_net(), mse_loss, synthetic_batches(), cfg, tmp_path / "a")


def test_resume_without_latest_takes_the_newest_checkpoint(tmp_path, capsys):
    cfg = quiet(max_steps=4, checkpoint_every=2)
    with pytest.raises(Crash):
        train(make_net(), crashing(mse_loss, at_step=3), synthetic_batches(), cfg, tmp_path)
    (tmp_path / "checkpoints" / "latest").unlink()
    resumed = train(make_net(), mse_loss, synthetic_batches(), cfg, tmp_path, resume=True)
    assert sorted(resumed.step_losses) == [3, 4]
    assert "no 'latest' file: resuming from the newest checkpoint step-0000002.pt" in capsys.readouterr().err


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    cfg = quiet(max_steps=3, warmup_steps=0)
    big_net, small_net = make_net(0.0), make_net(0.0)
    train(big_net, mse_loss, synthetic_batches(size=4), cfg, tmp_path / "big")

    def halves(epoch, start):  # batch k of the big stream = small batches 2k and 2k+1
        for index in range(start, 10):
            big = global_batch(epoch, index // 2, 4)
            part = slice(2 * (index % 2), 2 * (index % 2) + 2)
            yield {"x": big["x"][part], "y": big["y"][part]}

    train(small_net, mse_loss, halves, cfg.model_copy(update={"accumulation_steps": 2}), tmp_path / "small")
    for a, b in zip(big_net.parameters(), small_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_stay_and_extra_state_is_saved(tmp_path):
    net = make_net()
    net.body[0].requires_grad_(False)
    frozen = net.body[0].weight.clone()
    result = train(net, mse_loss, synthetic_batches(), quiet(max_steps=2), tmp_path,
                   extra_state={"category_ids": [1, 3, 7], "model_config": {"hidden": 8}})
    assert torch.equal(net.body[0].weight, frozen)
    payload = torch.load(result.checkpoint, weights_only=True)
    assert payload["category_ids"] == [1, 3, 7] and payload["model_config"] == {"hidden": 8}
    assert payload["config"]["max_steps"] == 2 and payload["step"] == 2


# ---------------------------------------------------------------- observability


def test_metrics_tensorboard_and_data_wait(tmp_path):
    def slow_batches(epoch, start):
        for batch in synthetic_batches()(epoch, start):
            time.sleep(0.03)
            yield batch

    cfg = quiet(max_steps=5, log_every=2, tensorboard=True, progress=True, checkpoint_every=10)
    train(make_net(), mse_loss, slow_batches, cfg, tmp_path)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 5]
    first = records[0]
    assert set(first) >= {"kind", "step", "epoch", "lr", "loss", "loss_mse", "loss_l1", "grad_norm",
                          "step_seconds", "data_wait_share", "seconds"}
    assert first["loss"] == pytest.approx(first["loss_mse"] + first["loss_l1"], rel=1e-6)
    assert all(r["data_wait_share"] > 0.5 for r in records)  # the loader sleeps, the step is tiny
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluate_runs_in_eval_mode_without_grad(tmp_path):
    calls = []

    def evaluate(model, step):
        calls.append((step, model.training, torch.is_grad_enabled()))
        return {"score": float(step)}

    result = train(make_net(), mse_loss, synthetic_batches(), quiet(max_steps=5, eval_every=2),
                   tmp_path, evaluate=evaluate)
    assert calls == [(2, False, False), (4, False, False), (5, False, False)]
    assert result.last_eval == {"score": 5.0}
    evals = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert [(r["step"], r["score"]) for r in evals] == [(2, 2.0), (4, 4.0), (5, 5.0)]


def test_amp_on_cpu_trains_in_float32_and_says_so(tmp_path, capsys):
    reference = train(make_net(), mse_loss, synthetic_batches(), quiet(max_steps=2), tmp_path / "a")
    amp = train(make_net(), mse_loss, synthetic_batches(), quiet(max_steps=2, amp="bf16"), tmp_path / "b")
    assert amp.step_losses == reference.step_losses
    assert "amp=bf16 needs CUDA" in capsys.readouterr().err


# ---------------------------------------------------------------- non-finite losses


def test_nan_batch_is_skipped_logged_and_never_applied(tmp_path):
    cfg = quiet(max_steps=4, warmup_steps=0)
    net = make_net(0.0)
    # batch 1 of epoch 0 holds images 4..7
    result = train(net, mse_loss, poisoned(synthetic_batches(num_batches=6), {5}), cfg, tmp_path / "nan")

    def without_batch_1(epoch, start):
        for index in [0, 2, 3, 4, 5][start:]:
            yield global_batch(epoch, index, 4)

    clean_net = make_net(0.0)
    train(clean_net, mse_loss, without_batch_1, cfg, tmp_path / "clean")
    for a, b in zip(net.parameters(), clean_net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert result.nonfinite == [{"kind": "nonfinite", "step": 1, "epoch": 0, "batch": 1, "reason": "loss",
                                 "image_ids": [4, 5, 6, 7], "action": "skip"}]
    assert [r for r in read_metrics(tmp_path / "nan") if r["kind"] == "nonfinite"] == result.nonfinite
    for path in list_checkpoints(tmp_path / "nan" / "checkpoints"):
        assert all(torch.isfinite(v).all() for v in load_training_checkpoint(path)["model"].values())


def test_nonfinite_gradient_with_a_finite_loss_is_skipped(tmp_path):
    def sqrt_loss(model, batch, step):  # d sqrt(x)/dx at 0 is inf: loss 0, gradient NaN
        out = mse_loss(model, batch, step)
        if 1 in batch["image_ids"]:
            out["loss"] = out["loss"] + torch.sqrt(model.body[0].weight.sum() * 0)
        return out

    result = train(make_net(), sqrt_loss, synthetic_batches(), quiet(max_steps=2), tmp_path)
    assert [(r["reason"], r["batch"]) for r in result.nonfinite] == [("grad", 0)]
    assert result.step == 2 and all(math.isfinite(v) for v in result.step_losses.values())


def test_on_nan_stop_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = quiet(max_steps=6, checkpoint_every=2, on_nan="stop")
    with pytest.raises(NonFiniteLossError, match=r"images \[12, 13, 14, 15\].*on_nan=stop"):
        train(make_net(), mse_loss, poisoned(synthetic_batches(), {13}), cfg, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000002.pt"]
    assert latest_checkpoint(tmp_path).name == "step-0000002.pt"
    assert read_metrics(tmp_path)[-1]["action"] == "stop"


def test_too_many_nonfinite_groups_in_a_row_stop(tmp_path):
    always_nan = poisoned(synthetic_batches(), set(range(100_000)))
    with pytest.raises(NonFiniteLossError, match="3 groups in a row"):
        train(make_net(), mse_loss, always_nan, quiet(max_consecutive_nan=3), tmp_path)
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_docs_list_every_train_config_field():
    doc = (REPO / "docs" / "training.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", doc.split("## Configuration")[1].split("\n## ")[0], re.M))
    assert listed == set(TrainConfig.model_fields)


# ---------------------------------------------------------------- the real pre-training unit


def _scene_batches(epoch: int, start: int):
    """Batches of one 64x64 image with 2 random bright squares: pseudo masks + their prompts."""
    from uplvp_model.backbone import PIXEL_MEAN, PIXEL_STD

    for index in range(start, 3):
        g = torch.Generator().manual_seed(epoch * 100 + index)
        image = torch.rand(3, 64, 64, generator=g) * 0.2
        masks = torch.zeros(2, 64, 64, dtype=torch.bool)
        boxes = []
        for k in range(2):
            x0, y0 = torch.randint(0, 40, (2,), generator=g).tolist()
            masks[k, y0:y0 + 20, x0:x0 + 20] = True
            image[k, y0:y0 + 20, x0:x0 + 20] = 0.9
            boxes.append([x0 / 64, y0 / 64, (x0 + 20) / 64, (y0 + 20) / 64])
        image = (image - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]
        prompts = {"boxes": torch.tensor(boxes), "shape_grids": torch.ones(2, 8, 8),
                   "embeddings": torch.nn.functional.normalize(torch.randn(2, 6, generator=g), dim=1)}
        yield {"images": image[None], "image_ids": [index], "prompts": [prompts],
               "targets": [{"masks": masks, "labels": torch.zeros(2, dtype=torch.long)}]}


def _prompted_model():
    from uplvp_model.config import model_config
    from uplvp_model.model import build_model
    from uplvp_model.pretraining import PromptedModel
    from uplvp_model.prompts import PromptEncoder

    torch.manual_seed(0)
    model = build_model(model_config("tiny", num_stages=2))
    return PromptedModel(model, PromptEncoder(model.cfg.hidden_dim, 6, 8), prompts_per_image=5)


def _pretrain_loss(model, batch, step):
    from uplvp_model.criterion import PretrainCriterion
    from uplvp_model.pretraining import pretraining_targets

    generator = torch.Generator().manual_seed(step)
    outputs = model(batch["images"], batch["prompts"], generator=generator)
    targets = pretraining_targets(outputs, [t["masks"] for t in batch["targets"]])
    return PretrainCriterion(num_points=64)(outputs, targets, kernel_to_prompt=outputs["kernel_to_prompt"],
                                            step=step, generator=generator)


def test_prompted_model_pretraining_resumes_exactly(tmp_path):
    cfg = quiet(max_steps=3, checkpoint_every=2, lr=1e-3)
    full_model = _prompted_model()
    full = train(full_model, _pretrain_loss, _scene_batches, cfg, tmp_path / "full")
    assert all(math.isfinite(v) for v in full.step_losses.values())
    assert {"loss_focal", "loss_dice", "loss_embedding_aux0"} <= set(read_metrics(tmp_path / "full")[0])
    with pytest.raises(Crash):
        train(_prompted_model(), crashing(_pretrain_loss, at_step=2), _scene_batches, cfg, tmp_path / "run")
    resumed_model = _prompted_model()
    resumed = train(resumed_model, _pretrain_loss, _scene_batches, cfg, tmp_path / "run", resume=True)
    assert resumed.step_losses[3] == pytest.approx(full.step_losses[3], rel=1e-5)
    for (key, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
