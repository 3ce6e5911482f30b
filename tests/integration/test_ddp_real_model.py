"""The real models under DistributedDataParallel: 2 gloo processes, each with half of every
global batch, train the QEIS model + SetCriterion (fine-tuning) and the PromptedModel +
PretrainCriterion (pre-training) to the same losses and weights as one process on the whole
batch (3 steps, within 1e-5). The backbone uses FrozenBatchNorm2d (``backbone_norm: frozen``),
as multi-GPU runs should: trained BatchNorm statistics differ with the per-GPU batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.helpers import free_port, spawn_and_wait

from pipeline.batching import collate
from pipeline.transforms import Sample
from pipeline.engine import TrainConfig, train
from uplvp_model.config import model_config
from uplvp_model.criterion import PretrainCriterion, SetCriterion
from uplvp_model.model import build_model
from uplvp_model.pretraining import PromptedModel, pretraining_targets
from uplvp_model.prompts import PromptEncoder

WORLD = 2
GLOBAL_BATCH = 4
STEPS = 3
TIMEOUT_S = 180
GRID, EMBEDDING = 4, 8


def _global_batch(index: int, with_prompts: bool) -> dict:
    rng = np.random.default_rng([7, index])
    samples = []
    for i in range(GLOBAL_BATCH):
        image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        masks = np.zeros((3, 64, 64), dtype=bool)
        for k in range(3):
            y, x = rng.integers(0, 40, 2)
            masks[k, y:y + 16 + 4 * k, x:x + 20] = True
        grids = rng.random((3, GRID, GRID)) > 0.5 if with_prompts else None
        embeddings = rng.standard_normal((3, EMBEDDING)).astype(np.float32) if with_prompts else None
        samples.append(Sample(10 * index + i, image, masks, np.array([0, 1, 0]), (64, 64), grids,
                              embeddings))
    return collate(samples)


def _make_batches(rank: int, world: int, with_prompts: bool):
    per_rank = GLOBAL_BATCH // world

    def make_batches(epoch: int, start_batch: int = 0):
        for index in range(start_batch, STEPS):
            batch = _global_batch(index, with_prompts)
            part = slice(rank * per_rank, (rank + 1) * per_rank)
            sliced = {"images": batch["images"][part], "image_ids": batch["image_ids"][part],
                      "targets": batch["targets"][part]}
            if with_prompts:
                sliced["prompts"] = batch["prompts"][part]
            yield sliced

    return make_batches


def _run(stage: str, out: Path, rank: int, world: int) -> tuple[dict, list[float]]:
    torch.manual_seed(0)
    cfg = model_config("tiny", num_classes=1 if stage == "pretrain" else 2,
                       backbone_norm="frozen")
    model = build_model(cfg)
    if stage == "pretrain":
        net = PromptedModel(model, PromptEncoder(cfg.hidden_dim, EMBEDDING, GRID), dropout=0.0)
        criterion = PretrainCriterion(num_points=None, identity_warmup_steps=2)

        def loss_fn(module, batch, step):
            outputs = module(batch["images"], batch["prompts"])
            targets = pretraining_targets(outputs, [t["masks"] for t in batch["targets"]])
            return criterion(outputs, targets, kernel_to_prompt=outputs["kernel_to_prompt"],
                             step=step)
    else:
        net = model
        criterion = SetCriterion(num_points=None)

        def loss_fn(module, batch, step):
            return criterion(module(batch["images"]), batch["targets"])

    train_cfg = TrainConfig(max_steps=STEPS, lr=1e-3, warmup_steps=0, checkpoint_every=100,
                            log_every=1, progress=False, tensorboard=False,
                            find_unused_parameters=stage == "pretrain")
    result = train(net, loss_fn, _make_batches(rank, world, stage == "pretrain"), train_cfg,
                   out / stage)
    return net.state_dict(), result.step_losses


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        report = {stage: _run(stage, Path(out) / f"rank{rank}", rank, WORLD)
                  for stage in ("finetune", "pretrain")}
        torch.save(report, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_real")
    spawn_and_wait(_worker, (free_port(), str(out)), WORLD, TIMEOUT_S)
    threads = torch.get_num_threads()  # a module fixture: the autouse restore does not cover it
    torch.set_num_threads(1)  # as the ranks
    try:
        single = {stage: _run(stage, out / "single", 0, 1) for stage in ("finetune", "pretrain")}
    finally:
        torch.set_num_threads(threads)
    return single, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_two_ranks_train_the_real_model_like_one_process(reports, stage):
    single, ranks = reports
    state, losses = single[stage]
    assert len(losses) == STEPS
    # each rank logs the loss of its half (normalised by the mean mask count over ranks):
    # their mean is the whole batch's loss
    mean = {step: sum(r[stage][1][step] for r in ranks) / WORLD for step in losses}
    assert mean == pytest.approx(losses, rel=1e-5)
    for report in ranks:
        rank_state, _ = report[stage]
        assert rank_state.keys() == state.keys()
        for key in state:
            a, b = rank_state[key], state[key]
            if key.endswith("attention.in_proj_bias"):
                # the key bias (middle third) has an exactly zero gradient (softmax ignores a
                # shift shared by all keys): Adam turns its float noise into lr-sized steps of
                # either sign, in one process as in two, so only queries and values compare
                d = a.shape[0] // 3
                a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
    # the weights moved: equality is not that of two untouched initialisations
    torch.manual_seed(0)
    first = build_model(model_config("tiny", num_classes=2, backbone_norm="frozen")).state_dict()
    moved = single["finetune"][0]
    assert any(not torch.allclose(moved[k], first[k]) for k in first if k in moved)
