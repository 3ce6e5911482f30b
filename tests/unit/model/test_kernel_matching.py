"""Prompt -> kernel assignment strategies and prompt injection with dropout."""
from __future__ import annotations

import pytest
import torch

from uplvp_model.kernel_matching import assign_prompts, assign_prompts_batch, inject


def test_spread_tiles_to_20_and_gives_5_kernels_each():
    out = assign_prompts(torch.randn(3, 8), torch.randn(100, 8), "spread")
    assert out.dtype == torch.long and out.shape == (100,)
    # entry e = n // 5 of the tiling (0, 1, 2, 0, 1, 2, ...) of 20 entries
    assert torch.equal(out, (torch.arange(100) // 5) % 3)
    assert out[:15].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert torch.bincount(out).tolist() == [35, 35, 30]  # 7, 7, 6 tiled entries of 5 kernels


def test_spread_truncates_extra_prompts_and_handles_few_kernels():
    out = assign_prompts(torch.randn(25, 4), torch.randn(100, 4), "spread", prompts_per_image=20)
    assert set(out.tolist()) == set(range(20))
    few = assign_prompts(torch.randn(3, 4), torch.randn(4, 4), "spread", prompts_per_image=8)
    assert few.tolist() == [0, 2, 1, 0]  # entries 0, 2, 4, 6 of the tiling 0 1 2 0 1 2 0 1


@pytest.mark.parametrize("strategy", ["spread", "cosine", "hungarian"])
def test_no_prompts_means_no_assignment(strategy):
    assert assign_prompts(torch.zeros(0, 4), torch.randn(5, 4), strategy).tolist() == [-1] * 5


def test_cosine_takes_the_most_similar_prompt_per_kernel():
    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    kernels = torch.tensor([[2.0, 0.1], [0.1, 3.0], [5.0, 4.0], [-1.0, 0.0]])
    assert assign_prompts(prompts, kernels, "cosine").tolist() == [0, 1, 0, 1]


def test_hungarian_is_one_to_one_and_optimal_not_greedy():
    prompts = torch.tensor([[1.0, 0.0], [0.9, 0.436]])
    kernels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # greedy would give kernel 0 to either prompt; the optimum puts prompt 1 on kernel 1
    assert assign_prompts(prompts, kernels, "hungarian").tolist() == [0, 1, -1]
    many = assign_prompts(torch.randn(5, 3), torch.randn(2, 3), "hungarian")
    assert len(set(many.tolist())) == 2 and min(many.tolist()) >= 0


def test_assign_batch_and_bad_input():
    out = assign_prompts_batch([torch.randn(2, 4), torch.zeros(0, 4)], torch.randn(2, 6, 4), "cosine")
    assert [o.shape for o in out] == [(6,), (6,)] and out[1].tolist() == [-1] * 6
    with pytest.raises(ValueError):
        assign_prompts(torch.randn(2, 4), torch.randn(6, 4), "nearest")
    with pytest.raises(ValueError):
        assign_prompts(torch.randn(2, 3), torch.randn(6, 4), "cosine")


def _kernels() -> torch.Tensor:
    kernels = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    kernels[0, 1, 0] = -0.0  # an unmatched kernel holding a negative zero must keep its sign bit
    return kernels


def test_inject_adds_matched_prompts_and_leaves_others_bit_identical():
    kernels = _kernels()
    prompts = [torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]]), torch.zeros(0, 3)]
    k2p = [torch.tensor([0, -1, 1, 0]), torch.full((4,), -1)]
    res = inject(kernels, prompts, k2p, dropout=0.5, training=False)
    assert torch.equal(res.kernels[0, 0], kernels[0, 0] + prompts[0][0])
    assert torch.equal(res.kernels[0, 2], kernels[0, 2] + prompts[0][1])
    assert torch.equal(res.kernels[0, 3], kernels[0, 3] + prompts[0][0])
    assert torch.equal(res.kernels[0, 1], kernels[0, 1]) and torch.signbit(res.kernels[0, 1, 0])
    assert torch.equal(res.kernels[1], kernels[1])
    assert [d.tolist() for d in res.dropped] == [[False, False], []]
    assert res.received[0].tolist() == [0, -1, 1, 0] and res.received[1].tolist() == [-1] * 4


def test_dropout_drops_whole_prompts_deterministically():
    kernels = torch.zeros(1, 12, 2)
    prompts = [torch.arange(1.0, 13.0).reshape(6, 2)]
    k2p = [torch.arange(12) // 2]  # every prompt goes to two kernels
    expected = torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < int(expected.sum()) < 6  # the seed drops some prompts, not all
    res = inject(kernels, prompts, k2p, dropout=0.5, generator=torch.Generator().manual_seed(1))
    again = inject(kernels, prompts, k2p, dropout=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(res.dropped[0], expected) and torch.equal(again.kernels, res.kernels)
    for n in range(12):
        p = n // 2
        want = torch.zeros(2) if expected[p] else prompts[0][p]
        assert torch.equal(res.kernels[0, n], want)
        assert res.received[0][n].item() == (-1 if expected[p] else p)


def test_no_dropout_draws_when_not_training():
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    res = inject(torch.zeros(1, 2, 2), [torch.ones(1, 2)], [torch.tensor([0, 0])], generator=gen, training=False)
    assert torch.equal(gen.get_state(), state) and not res.dropped[0].any()
    assert torch.equal(res.kernels, torch.ones(1, 2, 2))


def test_inject_passes_gradients_to_kernels_and_prompts():
    kernels = torch.randn(1, 3, 2, requires_grad=True)
    prompts = [torch.randn(2, 2, requires_grad=True)]
    out = inject(kernels, prompts, [torch.tensor([1, -1, 1])], dropout=0.0).kernels
    out.sum().backward()
    assert torch.equal(kernels.grad, torch.ones(1, 3, 2))
    assert torch.equal(prompts[0].grad, torch.tensor([[0.0, 0.0], [2.0, 2.0]]))


@pytest.mark.parametrize("k2p, dropout", [
    (torch.tensor([0, 2, -1]), 0.1),  # prompt 2 does not exist
    (torch.tensor([0, -1]), 0.1),  # wrong length
    (torch.tensor([0, 1, -1]), 1.0),  # dropout must be < 1
])
def test_inject_rejects_bad_input(k2p, dropout):
    with pytest.raises(ValueError):
        inject(torch.zeros(1, 3, 2), [torch.ones(2, 2)], [k2p], dropout=dropout)
