"""The backbone stage's objectives under DistributedDataParallel on CPU (2 gloo processes, each
half of every global batch): the ranks keep one query encoder, the keys of every rank enter
one queue (gathered), and the key batch is shuffled across ranks (MoCo's shuffling BatchNorm)
without changing which key belongs to which query."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers import free_port, spawn_and_wait

from pipeline.engine import TrainConfig, train
from uplvp_model.backbone import build_backbone
from uplvp_model.self_supervised import SelfSupervisedModel

pytest.importorskip("lightly")

WORLD = 2
GLOBAL_BATCH = 4
STEPS = 2
TIMEOUT_S = 180


def _batches(rank: int, world: int):
    per_rank = GLOBAL_BATCH // world

    def make_batches(epoch: int, start_batch: int = 0):
        for index in range(start_batch, STEPS):
            g = torch.Generator().manual_seed(100 + index)
            views = torch.randn(2, GLOBAL_BATCH, 3, 64, 64, generator=g)
            part = slice(rank * per_rank, (rank + 1) * per_rank)
            yield {"view_q": views[0, part], "view_k": views[1, part],
                   "image_ids": list(range(GLOBAL_BATCH))[part]}

    return make_batches


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = SelfSupervisedModel(build_backbone("tiny", (8, 8, 16, 16)), "densecl",
                                    projection_dim=8, hidden_dim=16, queue_size=32,
                                    dense_queue_size=64, temperature=0.5, momentum=0.9)
        cfg = TrainConfig(max_steps=STEPS, optimizer="sgd", lr=0.05, grad_clip=None,
                          warmup_steps=0, checkpoint_every=100, log_every=1, progress=False,
                          tensorboard=False)
        result = train(model, lambda m, b, s: m(b["view_q"], b["view_k"]), _batches(rank, WORLD),
                       cfg, Path(out) / f"rank{rank}")
        # the shuffle, applied and undone, returns each rank's own rows
        x = torch.arange(4.0).view(2, 2) + 10 * rank
        from lightly.models import utils

        shuffled, order = utils.batch_shuffle_distributed(x)
        restored = utils.batch_unshuffle_distributed(shuffled, order)
        torch.save({"state": model.state_dict(), "losses": result.step_losses,
                    "restored": restored, "x": x}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_ssl")
    spawn_and_wait(_worker, (free_port(), str(out)), WORLD, TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_keep_one_query_encoder_and_one_gathered_queue(reports):
    a, b = reports
    # parameters (BatchNorm statistics are each rank's own after its last forward)
    trained = [k for k in a["state"] if k.startswith(("backbone.", "projection.", "dense_projection."))
               and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(trained) > 20 and all(torch.equal(a["state"][k], b["state"][k]) for k in trained)
    for bank in ("criterion.memory_bank", "dense_criterion.memory_bank"):
        assert torch.equal(a["state"][f"{bank}.bank"], b["state"][f"{bank}.bank"])
    # every step queued the keys of all 4 images (2 per rank), not only the rank's own 2
    assert int(a["state"]["criterion.memory_bank.bank_ptr"]) == STEPS * GLOBAL_BATCH
    # dense keys: 4 images x (64 / 32)^2 locations per step
    assert int(a["state"]["dense_criterion.memory_bank.bank_ptr"]) == (STEPS * GLOBAL_BATCH * 4) % 64
    assert all(torch.isfinite(torch.tensor(list(r["losses"].values()))).all() for r in reports)


def test_shuffled_key_batch_is_restored_to_each_rank(reports):
    for report in reports:
        assert torch.equal(report["restored"], report["x"])
