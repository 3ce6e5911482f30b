"""The optional transformer encoder before the FPN (``pixel_encoder_layers``): one block against
an independent computation of multi-head attention, levels attending to each other, the
levels it leaves alone, and configs stored before it existed."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from uplvp_model.backbone import PixelDecoder
from uplvp_model.config import ModelConfig, model_config
from uplvp_model.model import build_model
from uplvp_model.pixel_encoder import PixelEncoder
from uplvp_model.position_encoding import sine_position_map


def planted_maps():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 6, 4, 6, generator=g), torch.randn(2, 10, 2, 3, generator=g)]


def test_one_block_matches_an_independent_computation():
    torch.manual_seed(0)
    encoder = PixelEncoder((6, 10), dim=8, num_layers=1, num_heads=2, ffn_dim=16).eval()
    maps = planted_maps()
    out = encoder(maps)
    assert [tuple(o.shape) for o in out] == [(2, 8, 4, 6), (2, 8, 2, 3)]

    tokens, positions = [], []
    for i, (proj, level) in enumerate(zip(encoder.input_proj, maps)):
        conv, norm = proj
        x = F.group_norm(F.conv2d(level, conv.weight, conv.bias), norm.num_groups, norm.weight,
                         norm.bias)
        tokens.append(x.flatten(2).transpose(1, 2))
        h, w = level.shape[-2:]
        positions.append(sine_position_map(h, w, 8).flatten(1).t() + encoder.level_embed[i])
    x = torch.cat(tokens, 1)
    pos = torch.cat(positions, 0)[None]
    layer = encoder.layers[0]
    wq, wk, wv = layer.attention.in_proj_weight.chunk(3)
    bq, bk, bv = layer.attention.in_proj_bias.chunk(3)
    q, k, v = F.linear(x + pos, wq, bq), F.linear(x + pos, wk, bk), F.linear(x, wv, bv)
    heads = []
    for hd in range(2):
        sl = slice(4 * hd, 4 * hd + 4)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(weights @ v[..., sl])
    attended = F.linear(torch.cat(heads, -1), layer.attention.out_proj.weight,
                        layer.attention.out_proj.bias)
    y = layer.attention_norm(x + attended)
    y = layer.ffn_norm(y + layer.ffn(y))
    expected = [y[:, :24].transpose(1, 2).reshape(2, 8, 4, 6),
                y[:, 24:].transpose(1, 2).reshape(2, 8, 2, 3)]
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_levels_attend_to_each_other():
    torch.manual_seed(0)
    encoder = PixelEncoder((6, 10), dim=8, num_layers=1, num_heads=2, ffn_dim=16).eval()
    maps = planted_maps()
    # a new pattern on the coarse level (a constant offset would be normalised away by the
    # level's input projection: the old +1.0 moved level 0 by ~3e-7, float noise)
    changed = [maps[0], torch.randn(maps[1].shape, generator=torch.Generator().manual_seed(1))]
    moved = (encoder(maps)[0] - encoder(changed)[0]).abs().max().item()
    assert moved > 1e-2, moved


def test_decoder_encodes_only_the_coarsest_levels():
    torch.manual_seed(0)
    decoder = PixelDecoder((4, 6, 8, 10), 8, 4, encoder_layers=1, encoder_levels=1,
                           num_heads=2, ffn_dim=16).eval()
    assert decoder.fpn.inner_blocks[2][0].in_channels == 8  # c4 untouched
    assert decoder.fpn.inner_blocks[3][0].in_channels == 8  # c5 encoded at width D
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(1, c, 32 // s, 32 // s, generator=g)
             for c, s in zip((4, 6, 8, 10), (1, 2, 4, 8))]
    seen = {}
    original = decoder.fpn.forward
    decoder.fpn.forward = lambda named: seen.setdefault("in", named) and original(named)
    decoder(feats)
    assert torch.equal(seen["in"]["c4"], feats[2])
    torch.testing.assert_close(seen["in"]["c5"], decoder.encoder([feats[3]])[0])
    assert decoder.fpn.inner_blocks[1][0].in_channels == 6
    plain = PixelDecoder((4, 6, 8, 10), 8, 4)
    assert plain.encoder is None


def test_model_config_field_validation_and_stored_configs():
    cfg = model_config("tiny", pixel_encoder_layers=2, pixel_encoder_levels=2)
    model = build_model(cfg)
    assert len(model.pixel_decoder.encoder.layers) == 2
    out = model(torch.randn(1, 3, 64, 96))
    assert out["pred_masks"].shape[-2:] == (16, 24)
    stored = model_config("tiny").to_dict()
    stored.pop("pixel_encoder_layers")
    stored.pop("pixel_encoder_levels")
    assert ModelConfig.from_dict(stored).pixel_encoder_layers == 0
    assert build_model(ModelConfig.from_dict(stored)).pixel_decoder.encoder is None
    for bad in ({"pixel_encoder_layers": -1}, {"pixel_encoder_levels": 4},
                {"pixel_encoder_levels": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model_config("tiny", **bad)
