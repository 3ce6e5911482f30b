"""Training checkpoints: weights_only content, RNG round trip, latest/keep-last, crash safety."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import uplvp_model.checkpoint as model_checkpoint
from pipeline.errors import InputError
from pipeline.engine import checkpoint as tc
from pipeline.engine.checkpoint import (
    LoopPosition,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    restore_training_state,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from pipeline.engine import train
from tests.helpers.training import Crash, make_net, mse_loss, quiet, synthetic_batches


def _parts(seed: int = 0):
    """A model after one AdamW step with its optimizer, LambdaLR scheduler and a disabled scaler."""
    net = make_net(seed=seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    net(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return net, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def _save(out, step: int, keep_last: int = 3, extra: dict | None = None):
    net, optimizer, scheduler, scaler = _parts()
    return save_training_checkpoint(
        out, model=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        position=LoopPosition(step, 1, 2), rng=[rng_state()], config={"max_steps": 10},
        extra=extra or {}, keep_last=keep_last)


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random()


def test_checkpoint_name_is_zero_padded():
    assert checkpoint_name(100) == "step-0000100.pt"
    assert checkpoint_name(12345678) == "step-12345678.pt"


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_save_writes_a_weights_only_checkpoint_and_restore_brings_everything_back(tmp_path):
    path = _save(tmp_path, 10, extra={"category_ids": [1, 5]})
    assert path == tmp_path / "checkpoints" / "step-0000010.pt"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000010.pt\n"
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == 1 and payload["training_format_version"] == 1
    assert (payload["step"], payload["epoch"], payload["batch_in_epoch"]) == (10, 1, 2)
    assert payload["category_ids"] == [1, 5] and payload["config"] == {"max_steps": 10}

    saved_net, saved_opt, saved_sched, _ = _parts()
    net, optimizer, scheduler, scaler = _parts(seed=7)
    position = restore_training_state(load_training_checkpoint(path), model=net, optimizer=optimizer,
                                      scheduler=scheduler, scaler=scaler)
    assert position == LoopPosition(10, 1, 2)
    for a, b in zip(saved_net.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    assert scheduler.get_last_lr() == saved_sched.get_last_lr() == [0.005]
    for a, b in zip(saved_opt.state.values(), optimizer.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and torch.equal(a["step"], b["step"])


def test_keep_last_prunes_older_checkpoints(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000006.pt", "step-0000008.pt"]
    assert latest_checkpoint(tmp_path).name == "step-0000008.pt"


def test_list_checkpoints_ignores_temporary_and_foreign_files(tmp_path):
    _save(tmp_path, 2)
    folder = tmp_path / "checkpoints"
    (folder / ".tmp-step-0000004.pt.x1y2").write_bytes(b"half a checkpoint")
    (folder / "notes.txt").write_text("x")
    assert [p.name for p in list_checkpoints(folder)] == ["step-0000002.pt"]


def test_crash_after_the_temp_file_leaves_the_previous_checkpoint_in_charge(tmp_path, monkeypatch):
    _save(tmp_path, 2)

    def killed(src, dst):  # the process dies after writing the temp file, before the rename
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(model_checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000002.pt"]
    assert load_training_checkpoint(latest_checkpoint(tmp_path))["step"] == 2


def test_crash_before_latest_moves_keeps_latest_on_the_older_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 2, keep_last=1)

    def killed(path, text):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tc, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4, keep_last=1)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-0000002.pt"
    # the next successful save moves latest and prunes both older files
    _save(tmp_path, 6, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000006.pt"]


def test_run_killed_mid_save_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = quiet(max_steps=6, checkpoint_every=2)
    full_net = make_net()
    full = train(full_net, mse_loss, synthetic_batches(), cfg, tmp_path / "full")

    real_replace = os.replace

    def killed_at_step_4(src, dst):
        if str(dst).endswith("step-0000004.pt"):
            raise Crash("killed while saving step 4")
        real_replace(src, dst)

    out = tmp_path / "run"
    monkeypatch.setattr(model_checkpoint.os, "replace", killed_at_step_4)
    with pytest.raises(Crash):
        train(make_net(), mse_loss, synthetic_batches(), cfg, out)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000002.pt"]
    net = make_net(seed=5)
    resumed = train(net, mse_loss, synthetic_batches(), cfg, out, resume=True)
    assert sorted(resumed.step_losses) == [3, 4, 5, 6]
    assert resumed.step_losses[6] == pytest.approx(full.step_losses[6], rel=1e-6)
    for a, b in zip(full_net.state_dict().values(), net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_latest_naming_a_missing_or_malformed_file_is_an_input_error(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "latest").write_text("step-0000009.pt\n")
    with pytest.raises(InputError, match="names step-0000009.pt, which does not exist"):
        latest_checkpoint(tmp_path)
    (folder / "latest").write_text("../../etc/passwd\n")
    with pytest.raises(InputError, match="does not name a checkpoint file"):
        latest_checkpoint(tmp_path)


def test_model_only_or_corrupt_checkpoints_are_input_errors(tmp_path):
    net = make_net()
    model_checkpoint.save_model_state(tmp_path / "model.pt", net, {"step": 3})
    with pytest.raises(InputError, match="not a training checkpoint .*optimizer"):
        load_training_checkpoint(tmp_path / "model.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt"):
        load_training_checkpoint(tmp_path / "bad.pt")


def test_extra_state_may_not_clash_or_hold_non_plain_values(tmp_path):
    with pytest.raises(ValueError, match="reserved checkpoint key.*step"):
        _save(tmp_path, 2, extra={"step": 1})
    with pytest.raises(ValueError, match="numpy"):
        _save(tmp_path, 2, extra={"ids": np.arange(3)})
    assert list_checkpoints(tmp_path / "checkpoints") == []
