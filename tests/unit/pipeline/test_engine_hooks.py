"""pipeline.engine hooks: call order, and the best checkpoint across an interrupted run."""
from __future__ import annotations

import torch

from pipeline.engine import BestCheckpointer, HookBase, train
from tests.helpers.training import make_net, mse_loss, quiet, synthetic_batches
from uplvp_model.checkpoint import read_checkpoint

# a planted validation metric by step: the best (0.9) comes at step 4, before the interruption
PLANTED = {2: 0.5, 4: 0.9, 6: 0.3, 8: 0.4}


def planted_eval(model, step):
    return {"val/score": PLANTED[step]}


class Recorder(HookBase):
    """Records every call as (method, step)."""

    def __init__(self):
        self.calls = []

    def before_train(self, trainer):
        self.calls.append(("before_train", trainer.step))

    def after_step(self, trainer):
        self.calls.append(("after_step", trainer.step))

    def after_eval(self, trainer, values):
        self.calls.append(("after_eval", trainer.step, values["val/score"]))

    def after_train(self, trainer):
        self.calls.append(("after_train", trainer.step))


def test_hooks_are_called_around_every_step_and_evaluation(tmp_path):
    recorder = Recorder()
    train(make_net(), mse_loss, synthetic_batches(), quiet(max_steps=4, eval_every=2),
          tmp_path / "run", evaluate=planted_eval, hooks=[recorder])
    assert recorder.calls == [
        ("before_train", 0),
        ("after_step", 1),
        ("after_eval", 2, 0.5), ("after_step", 2),
        ("after_step", 3),
        ("after_eval", 4, 0.9), ("after_step", 4),
        ("after_train", 4),
    ]


def best_of(path):
    payload = read_checkpoint(path)
    return payload["step"], payload["val/score"], payload["tag"]


class Interrupt(Exception):
    pass


class InterruptAt(HookBase):
    """Raises in ``after_step`` of ``step`` (before that step's checkpoint: the run resumes
    from the checkpoint before it)."""

    def __init__(self, step):
        self.step = step

    def after_step(self, trainer):
        if trainer.step == self.step:
            raise Interrupt


def test_best_checkpoint_survives_a_resume(tmp_path):
    """A run interrupted at step 5 and resumed (from step 4) ends with the same best.pt as an
    uninterrupted one: the step-4 model (0.9), not the resumed run's first evaluation (0.3 at
    step 6, which a best that restarted from nothing would save)."""
    out, full = tmp_path / "resumed", tmp_path / "full"
    cfg = quiet(max_steps=8, eval_every=2, checkpoint_every=2, warmup_steps=0)

    def best():
        return BestCheckpointer("val/score", extra=lambda: {"tag": "planted"})

    first = best()
    try:
        train(make_net(), mse_loss, synthetic_batches(), cfg, out, evaluate=planted_eval,
              hooks=[first, InterruptAt(5)])
    except Interrupt:
        pass
    assert (first.best_step, first.best_value) == (4, 0.9)
    resumed = best()
    train(make_net(), mse_loss, synthetic_batches(), cfg, out, resume=True,
          evaluate=planted_eval, hooks=[resumed])
    assert (resumed.best_step, resumed.best_value) == (4, 0.9)
    assert best_of(out / "checkpoints" / "best.pt") == (4, 0.9, "planted")

    uninterrupted = best()
    train(make_net(), mse_loss, synthetic_batches(), cfg, full, evaluate=planted_eval,
          hooks=[uninterrupted])
    assert (uninterrupted.best_step, uninterrupted.best_value) == (4, 0.9)
    saved_resumed = read_checkpoint(out / "checkpoints" / "best.pt")["model"]
    saved_full = read_checkpoint(full / "checkpoints" / "best.pt")["model"]
    assert saved_resumed.keys() == saved_full.keys()
    for key in saved_full:
        torch.testing.assert_close(saved_resumed[key], saved_full[key], rtol=0, atol=0)


def test_a_best_file_from_after_the_resumed_step_is_not_trusted(tmp_path):
    """best.pt written at step 4 while the newest checkpoint is step 2 (killed in between):
    the resumed run does not keep a value from steps it is about to redo."""
    out = tmp_path / "run"
    cfg = quiet(max_steps=4, eval_every=2, checkpoint_every=2, warmup_steps=0, keep_last=5)
    train(make_net(), mse_loss, synthetic_batches(), cfg, out, evaluate=planted_eval,
          hooks=[BestCheckpointer("val/score", extra=dict)])
    (out / "checkpoints" / "step-0000004.pt").unlink()
    (out / "checkpoints" / "latest").write_text("step-0000002.pt")
    probe = BestCheckpointer("val/score", extra=dict)

    class Stop(HookBase):
        def before_train(self, trainer):
            raise Interrupt  # read what before_train restored, train nothing

    try:
        train(make_net(), mse_loss, synthetic_batches(), cfg, out, resume=True,
              evaluate=planted_eval, hooks=[probe, Stop()])
    except Interrupt:
        pass
    assert probe.best_step is None and probe.best_value is None
