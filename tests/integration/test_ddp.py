"""DistributedDataParallel on CPU: 2 gloo processes, each taking half of every global batch,
train to the same weights as 1 process on the full batch; the criterion's mask-count
normaliser is averaged over ranks; a crashed DDP run resumes exactly (per-rank RNG)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers import free_port, spawn_and_wait

from pipeline.engine import TrainConfig, distributed_info, train
from tests.helpers.training import Crash, crashing, make_net, mse_loss, poisoned, quiet, synthetic_batches
from uplvp_model.criterion import num_masks_normaliser

WORLD = 2
TIMEOUT_S = 90
# One image of global batch 1 (images 4..7) is NaN; it sits in rank 1's half (images 6, 7).
NAN_IMAGE = 7


def _configs() -> dict[str, TrainConfig]:
    return {
        "plain": quiet(max_steps=4, checkpoint_every=2, warmup_steps=0),
        "accumulate_nan": quiet(max_steps=3, checkpoint_every=10, accumulation_steps=2, warmup_steps=0),
        "dropout": quiet(max_steps=4, checkpoint_every=2),
    }


def _data(name: str, rank: int, world: int):
    batches = synthetic_batches(num_batches=6, size=4, rank=rank, world_size=world)
    return poisoned(batches, {NAN_IMAGE}) if name == "accumulate_nan" else batches


def _run(name: str, out: Path, rank: int, world: int):
    net = make_net(dropout=0.2 if name == "dropout" else 0.0)
    result = train(net, mse_loss, _data(name, rank, world), _configs()[name], out / name)
    return net, result


def _worker(rank: int, port: int, out: str) -> None:
    out = Path(out)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        info = distributed_info()
        labels = torch.zeros(3 if rank == 0 else 1)
        report = {
            "info": (info.rank, info.world_size),
            "normaliser": num_masks_normaliser([{"labels": labels}], torch.device("cpu")),
            "normaliser_empty": num_masks_normaliser([{"labels": torch.zeros(0)}], torch.device("cpu")),
        }
        for name in ("plain", "accumulate_nan", "dropout"):
            net, result = _run(name, out, rank, WORLD)
            report[name] = {"state": net.state_dict(), "losses": result.step_losses,
                            "nonfinite": result.nonfinite}
        cfg = _configs()["dropout"]
        with pytest.raises(Crash):
            train(make_net(0.2), crashing(mse_loss, at_step=3), _data("dropout", rank, WORLD), cfg,
                  out / "resumed")
        net = make_net(0.2, seed=11)
        result = train(net, mse_loss, _data("dropout", rank, WORLD), cfg, out / "resumed", resume=True)
        report["resumed"] = {"state": net.state_dict(), "losses": result.step_losses}
        torch.save(report, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def ddp_reports(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    spawn_and_wait(_worker, (free_port(), str(out)), WORLD, TIMEOUT_S)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_criterion_normaliser_is_the_mean_mask_count_over_ranks(ddp_reports):
    _, reports = ddp_reports
    assert [r["info"] for r in reports] == [(0, 2), (1, 2)]
    assert [r["normaliser"] for r in reports] == [2.0, 2.0]  # (3 + 1) / 2
    assert [r["normaliser_empty"] for r in reports] == [1.0, 1.0]  # clamped


def test_normaliser_without_torch_distributed_is_the_local_count():
    assert num_masks_normaliser([{"labels": torch.zeros(3)}, {"labels": torch.zeros(2)}], torch.device("cpu")) == 5.0


@pytest.mark.parametrize("name", ["plain", "accumulate_nan"])
def test_two_ranks_on_half_batches_match_one_process_on_the_full_batch(ddp_reports, tmp_path, name):
    out, reports = ddp_reports
    single_net, single = _run(name, tmp_path, rank=0, world=1)
    for report in reports:
        _assert_same_weights(report[name]["state"], single_net.state_dict())
    # each rank's loss is the mean over its half: their mean is the full-batch loss
    for step, loss in single.step_losses.items():
        halves = [r[name]["losses"][step] for r in reports]
        assert sum(halves) / WORLD == pytest.approx(loss, rel=1e-5)
    # only rank 0 wrote: one metrics line per step, checkpoints once
    steps = [json.loads(line)["step"] for line in (out / name / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, _configs()[name].max_steps + 1))


def test_a_nan_on_one_rank_skips_the_group_on_every_rank(ddp_reports, tmp_path):
    _, reports = ddp_reports
    _, single = _run("accumulate_nan", tmp_path, rank=0, world=1)
    # group 0 = global batches 0 and 1 (images 0..7); rank 0 holds 0,1,4,5 and rank 1 holds 2,3,6,7
    expected = {"kind": "nonfinite", "step": 0, "epoch": 0, "batch": 1, "reason": "loss",
                "image_ids": [0, 1, 4, 5, 2, 3, 6, 7], "action": "skip"}
    assert [r["accumulate_nan"]["nonfinite"] for r in reports] == [[expected], [expected]]
    assert single.nonfinite[0]["image_ids"] == list(range(8))


def test_ddp_resume_restores_each_ranks_rng(ddp_reports):
    _, reports = ddp_reports
    for report in reports:
        assert sorted(report["resumed"]["losses"]) == [3, 4]
        for step in (3, 4):
            assert report["resumed"]["losses"][step] == pytest.approx(report["dropout"]["losses"][step], rel=1e-6)
        _assert_same_weights(report["resumed"]["state"], report["dropout"]["state"])
    _assert_same_weights(reports[0]["dropout"]["state"], reports[1]["dropout"]["state"])
