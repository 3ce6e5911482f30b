"""Sine position encodings, box/mask pooling and the PromptEncoder."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from uplvp_model.position_encoding import box_position_encoding, sine_encoding, sine_position_map
from uplvp_model.prompts import PromptEncoder, box_pool_weights, mask_pool_weights, weighted_pool

D, E, G = 16, 8, 4


def test_sine_encoding_of_zero_is_sin0_cos0_in_alternating_slots():
    out = sine_encoding(torch.zeros(3, 2), 6)
    assert out.shape == (3, 12)
    assert torch.equal(out[:, 0::2], torch.zeros(3, 6))
    assert torch.equal(out[:, 1::2], torch.ones(3, 6))


def test_box_position_encoding_exact_slots_cxcywh():
    box = torch.tensor([[0.25, 0.25, 0.75, 0.75]])  # cx = cy = w = h = 0.5
    out = box_position_encoding(box, D)  # 4 features per coordinate, dim_t = (1, 1, 100, 100)
    per_coord = torch.tensor([math.sin(math.pi), math.cos(math.pi), math.sin(math.pi / 100), math.cos(math.pi / 100)])
    torch.testing.assert_close(out[0], per_coord.repeat(4), atol=1e-6, rtol=0)


def test_box_position_encoding_xyxy_keeps_coordinates():
    box = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    out = box_position_encoding(box, 8, box_format="xyxy")  # 2 features per coordinate
    torch.testing.assert_close(out[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, -1.0]), atol=1e-6, rtol=0)


def test_sine_position_map_exact_values():
    pos = sine_position_map(2, 4, 8)
    assert pos.shape == (8, 2, 4)
    # y of row 0 is 0.25 -> sin(pi / 2) = 1, cos = 0 ; x of column 1 is 0.375 -> sin(0.75 pi)
    torch.testing.assert_close(pos[0, 0], torch.ones(4))
    torch.testing.assert_close(pos[1, 0], torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(pos[4, :, 1], torch.full((2,), math.sin(0.75 * math.pi)))
    assert torch.equal(pos[4:, 0], pos[4:, 1])  # x channels do not depend on the row


@pytest.mark.parametrize("call", [
    lambda: box_position_encoding(torch.zeros(1, 4), 12),
    lambda: sine_position_map(2, 2, 6),
    lambda: sine_encoding(torch.zeros(1, 1), 3),
])
def test_position_encodings_reject_bad_widths(call):
    with pytest.raises(ValueError):
        call()


def test_box_pool_weights_exact_coverage():
    boxes = torch.tensor([
        [0.0, 0.0, 0.5, 0.5],  # the top-left 2 x 2 cells
        [0.125, 0.0, 0.375, 0.25],  # half of cells (0, 0) and (0, 1)
        [0.5, 0.5, 0.5, 0.5],  # a point: widened to one cell around (2, 2)
    ])
    w = box_pool_weights(boxes, 4, 4)
    expected = torch.zeros(3, 4, 4)
    expected[0, :2, :2] = 1.0
    expected[1, 0, :2] = 0.5
    expected[2, 1:3, 1:3] = 0.25
    assert torch.equal(w, expected)


def test_mask_pool_weights_use_mask_and_fall_back_to_box():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 4:, 4:] = True  # bottom-right quarter
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])  # mask 1 is empty -> box
    w = mask_pool_weights(masks, boxes, 2, 2)
    assert torch.equal(w[0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(w[1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_weighted_pool_is_the_masked_mean():
    features = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]])  # [2, 2, 2]
    weights = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]])
    assert torch.equal(weighted_pool(features, weights), torch.tensor([[2.0, 20.0], [4.0, 40.0]]))


def _prompts(num: list[int], seed: int = 0, with_embeddings: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in num:
        xy = torch.rand(p, 2, generator=g) * 0.5
        wh = torch.rand(p, 2, generator=g) * 0.5
        out.append({
            "boxes": torch.cat([xy, xy + wh], dim=1),
            "shape_grids": (torch.rand(p, G, G, generator=g) > 0.5).float(),
            "embeddings": torch.randn(p, E, generator=g) if with_embeddings else None,
        })
    return out


def _features(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, D, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_encoder_shapes_and_empty_prompt_lists():
    torch.manual_seed(0)
    enc = PromptEncoder(D, E, G)
    out = enc(_features(), _prompts([3, 0]))
    assert [tuple(o.shape) for o in out] == [(3, D), (0, D)]
    assert torch.isfinite(out[0]).all()


# part -> (module name, encoder switches shared by "on" and "off", perturbation of its input).
# Position is tested with pooling off, because pooling also reads the boxes.
PARTS = {
    "pooled": ("pooled_proj", {}, lambda p, f: (p, f + 1.0)),
    "position": ("position_proj", {"use_pooled": False},
                 lambda p, f: ([{**d, "boxes": d["boxes"] * 0.5} for d in p], f)),
    "shape": ("shape_mlp", {}, lambda p, f: ([{**d, "shape_grids": 1 - d["shape_grids"]} for d in p], f)),
    "embedding": ("embedding_proj", {}, lambda p, f: ([{**d, "embeddings": d["embeddings"] + 1} for d in p], f)),
}


@pytest.mark.parametrize("part", sorted(PARTS))
def test_switching_a_part_off_removes_its_parameters_and_its_input(part):
    module_name, base, perturb = PARTS[part]
    torch.manual_seed(0)
    on = PromptEncoder(D, E, G, **base)
    off = PromptEncoder(D, E, G, **base, **{f"use_{part}": False})
    assert getattr(off, module_name) is None
    assert not any(n.startswith(module_name) for n, _ in off.named_parameters())
    assert any(n.startswith(module_name) for n, _ in on.named_parameters())
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith(module_name) for k in unexpected)
    prompts, feats = _prompts([3, 2]), _features()
    new_prompts, new_feats = perturb(prompts, feats)
    assert not torch.allclose(on(feats, prompts)[0], off(feats, prompts)[0])
    assert torch.equal(off(feats, prompts)[0], off(new_feats, new_prompts)[0])
    assert not torch.allclose(on(feats, prompts)[0], on(new_feats, new_prompts)[0])


def test_missing_embeddings_contribute_nothing():
    torch.manual_seed(0)
    full = PromptEncoder(D, E, G)
    without = PromptEncoder(D, E, G, use_embedding=False)
    without.load_state_dict(full.state_dict(), strict=False)
    feats, prompts = _features(), _prompts([3, 1], with_embeddings=False)
    for a, b in zip(full(feats, prompts), without(feats, prompts)):
        assert torch.equal(a, b)


def test_pooled_part_pools_inside_the_mask():
    enc = PromptEncoder(D, None, G, use_position=False, use_shape=False, use_embedding=False)
    with torch.no_grad():
        enc.pooled_proj.weight.copy_(torch.eye(D))
        enc.pooled_proj.bias.zero_()
    feats = _features(batch=1)
    masks = torch.zeros(1, 12, 12, dtype=torch.bool)
    masks[0, 2:4, 10:12] = True  # exactly feature cell (1, 5) of the 6 x 6 map
    prompt = {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "shape_grids": torch.zeros(1, G, G), "masks": masks}
    out = enc(feats, [prompt])[0]
    torch.testing.assert_close(out[0], F.layer_norm(feats[0, :, 1, 5], (D,)))


def test_gradients_reach_features_and_every_part():
    torch.manual_seed(0)
    enc = PromptEncoder(D, E, G)
    feats = _features().requires_grad_()
    out = enc(feats, _prompts([3, 2]))
    (torch.cat(out) * torch.randn(5, D)).sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    for name, param in enc.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("bad", [
    {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.9]])},  # x1 < x0
    {"shape_grids": torch.zeros(1, G + 1, G + 1)},
    {"embeddings": torch.zeros(2, E)},  # 2 embeddings for 1 box
    {"boxes": torch.tensor([[0.0, 0.0, float("nan"), 1.0]])},
])
def test_bad_prompts_raise_value_error(bad):
    enc = PromptEncoder(D, E, G)
    prompt = {"boxes": torch.tensor([[0.1, 0.1, 0.4, 0.4]]), "shape_grids": torch.zeros(1, G, G),
              "embeddings": torch.zeros(1, E), **bad}
    with pytest.raises(ValueError):
        enc(_features(batch=1), [prompt])


def test_encoder_rejects_no_parts_and_batch_mismatch():
    with pytest.raises(ValueError):
        PromptEncoder(D, E, G, use_pooled=False, use_position=False, use_shape=False, use_embedding=False)
    with pytest.raises(ValueError):
        PromptEncoder(D, E, G)(_features(batch=2), _prompts([1]))
