"""The self-supervised objectives against independent computations, and the two-view loader.

MoCo v2: InfoNCE of each query against its key and the queue, after the key encoder's EMA step;
the keys then enter the queue, which is part of the state dict. DenseCL: the dense positives are
the key locations with the most similar backbone features.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.batching import sample_rng
from pipeline.ssl_views import ViewSource, seeded_global_rngs, view_loader
from pipeline.synth import write_synth_dataset
from pipeline.manifest import load_manifest
from uplvp_model.backbone import build_backbone
from uplvp_model.self_supervised import SelfSupervisedModel, backbone_state

pytest.importorskip("lightly")


def tiny_model(objective: str, **options) -> SelfSupervisedModel:
    torch.manual_seed(0)
    backbone = build_backbone("tiny", (8, 8, 16, 16))
    defaults = dict(projection_dim=8, hidden_dim=16, queue_size=6, dense_queue_size=10,
                    temperature=0.5, momentum=0.9)
    return SelfSupervisedModel(backbone, objective, **{**defaults, **options})


def ema(query: torch.nn.Module, key: torch.nn.Module, m: float) -> torch.nn.Module:
    """An independent copy of ``key`` moved to ``m * key + (1 - m) * query`` (parameters)."""
    out = copy.deepcopy(key)
    with torch.no_grad():
        for p_out, p_q in zip(out.parameters(), query.parameters()):
            p_out.mul_(m).add_(p_q, alpha=1 - m)
    return out


def infonce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float) -> torch.Tensor:
    """Mean over rows of -log softmax([q.k, q.n_1, ...] / t)[0], all L2-normalised."""
    q, k, negatives = (F.normalize(x, dim=1) for x in (q, k, negatives))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / t
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def views(batch: int = 4, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


def test_mocov2_loss_is_infonce_against_the_queue_after_the_ema_step():
    model = tiny_model("mocov2").train()
    x_q, x_k = views()
    bank_before = model.criterion.memory_bank.bank.clone()  # [6, 8], rows normalised
    key_backbone = ema(model.backbone, model.backbone_momentum, 0.9)
    key_head = ema(model.projection, model.projection_momentum, 0.9)
    query_backbone, query_head = copy.deepcopy(model.backbone), copy.deepcopy(model.projection)
    terms = model(x_q, x_k)
    q = query_head(query_backbone(x_q)[-1].mean(dim=(2, 3)))
    with torch.no_grad():
        k = key_head(key_backbone(x_k)[-1].mean(dim=(2, 3)))
    expected = infonce(q, k, bank_before, 0.5)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    assert set(terms) == {"loss", "loss_global"}
    # the EMA step happened in the call: the key encoder is the independent copy
    for got, want in zip(model.backbone_momentum.parameters(), key_backbone.parameters()):
        torch.testing.assert_close(got, want)
    # the four keys entered the queue (normalised) at its start; the rest is as before
    bank = model.criterion.memory_bank.bank
    torch.testing.assert_close(bank[:4], F.normalize(k, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bank[4:], bank_before[4:])
    assert int(model.criterion.memory_bank.bank_ptr) == 4
    state = model.state_dict()  # the queue is part of the state (exact resume)
    assert torch.equal(state["criterion.memory_bank.bank"], bank)
    assert int(state["criterion.memory_bank.bank_ptr"]) == 4


def test_eval_mode_changes_neither_key_encoder_nor_queue():
    model = tiny_model("mocov2")
    model.eval()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model(*views())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_densecl_dense_positives_are_the_most_similar_key_locations():
    model = tiny_model("densecl", dense_weight=0.25).train()
    x_q, x_k = views(batch=2, size=64)  # c5: 2 x 2 locations
    dense_bank = model.dense_criterion.memory_bank.bank.clone()
    global_bank = model.criterion.memory_bank.bank.clone()
    key_backbone = ema(model.backbone, model.backbone_momentum, 0.9)
    key_head = ema(model.projection, model.projection_momentum, 0.9)
    key_dense = ema(model.dense_projection, model.dense_projection_momentum, 0.9)
    q_backbone = copy.deepcopy(model.backbone)
    q_head, q_dense = copy.deepcopy(model.projection), copy.deepcopy(model.dense_projection)
    terms = model(x_q, x_k)

    fq = q_backbone(x_q)[-1].flatten(2).transpose(1, 2)  # [2, 4, C]
    with torch.no_grad():
        fk = key_backbone(x_k)[-1].flatten(2).transpose(1, 2)
        kd = key_dense(fk)
        k = key_head(fk.mean(dim=1))
    similarity = torch.einsum("bnc,bmc->bnm", F.normalize(fq, dim=2), F.normalize(fk, dim=2))
    match = similarity.argmax(dim=2)  # [2, 4]: the key location of each query location
    positives = torch.stack([kd[b, match[b]] for b in range(2)])
    dense = infonce(q_dense(fq).flatten(end_dim=1), positives.flatten(end_dim=1), dense_bank, 0.5)
    global_ = infonce(q_head(fq.mean(dim=1)), k, global_bank, 0.5)
    torch.testing.assert_close(terms["loss_dense"], dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_global"], global_, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], 0.75 * global_ + 0.25 * dense, rtol=1e-5, atol=1e-6)
    # 8 dense keys queued
    assert int(model.dense_criterion.memory_bank.bank_ptr) == 8


def test_only_the_query_encoder_trains_and_its_state_is_the_backbone_export():
    model = tiny_model("densecl")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] in {"backbone", "projection", "dense_projection"}
                             for n in trainable)
    exported = backbone_state(model)
    assert set(exported) == {f"backbone.{k}" for k in model.backbone.state_dict()}
    assert all(k.startswith("backbone.body.") for k in exported)
    with pytest.raises(ValueError, match="objective must be one of mocov2, densecl"):
        tiny_model("simclr")


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl_views")
    write_synth_dataset(root, seed=5, num_unlabeled=6, num_train=0, num_val=0, image_size=64,
                        progress=False)
    return root / "unlabeled.yaml"


def test_views_depend_on_seed_epoch_and_index_only(unlabeled):
    source = ViewSource(load_manifest(unlabeled).images, image_size=32)
    first = source.load(2, sample_rng(0, 3, 2))
    torch.manual_seed(123)
    np.random.seed(7)
    state = torch.get_rng_state()
    again = source.load(2, sample_rng(0, 3, 2))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert torch.equal(first["view_q"], again["view_q"]) and torch.equal(first["view_k"], again["view_k"])
    assert first["view_q"].shape == (3, 32, 32)
    assert not torch.equal(first["view_q"], first["view_k"])  # two different augmentations
    other_epoch = source.load(2, sample_rng(0, 4, 2))
    assert not torch.equal(first["view_q"], other_epoch["view_q"])


def test_seeded_global_rngs_restore_every_generator():
    torch.manual_seed(1)
    np.random.seed(1)
    import random
    random.seed(1)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    with seeded_global_rngs(42):
        inside = torch.rand(1), np.random.rand(), random.random()
    with seeded_global_rngs(42):
        assert (torch.rand(1), np.random.rand(), random.random()) == inside
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_view_batches_do_not_depend_on_worker_processes(unlabeled):
    inline = view_loader(unlabeled, 2, image_size=32, seed=4, num_workers=0)
    workers = view_loader(unlabeled, 2, image_size=32, seed=4, num_workers=2)
    a, b = list(inline.make_batches(1, 1)), list(workers.make_batches(1, 1))
    assert len(a) == len(b) == 2  # 6 images, batch 2, from batch 1 on
    for x, y in zip(a, b):
        assert x["image_ids"] == y["image_ids"]
        assert torch.equal(x["view_q"], y["view_q"]) and torch.equal(x["view_k"], y["view_k"])
