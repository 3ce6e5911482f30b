"""Dense CLIP features, text embeddings and the clip proposer, on a tiny random-init ViT.

Random weights give meaningless masks: these tests check shapes, the recipe and structure.
"""
from __future__ import annotations

import logging

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from uplvp_model.proposal import clip_dense
from uplvp_model.proposal import text as text_module
from uplvp_model.proposal.factory import build_proposer
from uplvp_model.proposal.clip_dense import (
    ClipProposer,
    dense_clip_features,
    interpolate_positional_embedding,
    load_clip,
)
from uplvp_model.proposal.text import TextEmbeddingCache, encode_vocabulary
from uplvp_model.proposal.vocabulary import COCO_CLASSES, PROMPT_TEMPLATES, check_templates, check_vocabulary
from tests.helpers import ASSETS

TINY = "tiny-clip-vit"
CONFIG = ASSETS / f"{TINY}.json"


@pytest.fixture(scope="module")
def tiny():
    open_clip.add_model_config(CONFIG)
    return load_clip(TINY, None)


def _images(seed: int, batch: int, height: int, width: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32))


def test_dense_features_shapes_and_unit_norm(tiny):
    native = dense_clip_features(tiny.model, _images(0, 2, 32, 32))
    assert native.shape == (2, 32, 2, 2)
    larger = dense_clip_features(tiny.model, _images(1, 1, 48, 64))  # 3 x 4 patches, not native
    assert larger.shape == (1, 32, 3, 4)
    for features in (native, larger):
        torch.testing.assert_close(features.norm(dim=1), torch.ones_like(features[:, 0]))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dense_clip_features(tiny.model, _images(2, 1, 40, 32))


def test_value_path_recipe_matches_manual_computation(tiny):
    """At the native size, the recipe equals open_clip's own embedding + blocks, then the last
    block's attention forced to attend each token to itself (attention = identity, so its
    output is exactly out_proj(v)), no residual and no MLP, then ln_post and proj."""
    visual = tiny.model.visual
    images = _images(3, 2, 32, 32)
    with torch.no_grad():
        x = visual._embeds(images)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        last = visual.transformer.resblocks[-1]
        tokens = x.shape[1]
        self_only = torch.full((tokens, tokens), float("-inf"))
        self_only.fill_diagonal_(0.0)
        normed = last.ln_1(x)
        attended = last.attn(normed, normed, normed, need_weights=False, attn_mask=self_only)[0]
        expected = F.normalize(visual.ln_post(attended[:, 1:]) @ visual.proj, dim=-1)
        expected = expected.transpose(1, 2).reshape(2, -1, 2, 2)
        actual = dense_clip_features(tiny.model, images)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_positional_embedding_interpolation():
    positional = torch.randn(1 + 2 * 2, 8)
    assert interpolate_positional_embedding(positional, (2, 2), (2, 2)) is positional
    resized = interpolate_positional_embedding(positional, (2, 2), (3, 5))
    assert resized.shape == (1 + 3 * 5, 8)
    torch.testing.assert_close(resized[0], positional[0])  # class token untouched
    constant = torch.cat([torch.zeros(1, 8), torch.full((4, 8), 0.25)])
    torch.testing.assert_close(
        interpolate_positional_embedding(constant, (2, 2), (4, 3))[1:], torch.full((12, 8), 0.25)
    )


def test_text_embeddings_average_templates_and_are_cached(tiny, tmp_path, monkeypatch):
    vocabulary, templates = ["cat", "dog"], ["a photo of a {}.", "a {}"]
    embeddings = encode_vocabulary(tiny.model, tiny.tokenizer, vocabulary, templates)
    assert embeddings.shape == (2, 32) and embeddings.dtype == torch.float32
    with torch.no_grad():
        per_prompt = F.normalize(tiny.model.encode_text(tiny.tokenizer(["a photo of a dog.", "a dog"])), dim=-1)
    torch.testing.assert_close(embeddings[1], F.normalize(per_prompt.mean(0), dim=0), rtol=1e-5, atol=1e-6)

    cache = TextEmbeddingCache()
    cache_file = tmp_path / "text.pt"
    first = cache.get(tiny.model, tiny.tokenizer, tiny.model_key, vocabulary, templates, cache_file=cache_file)
    second = cache.get(tiny.model, tiny.tokenizer, tiny.model_key, vocabulary, templates, cache_file=cache_file)
    assert second is first and (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(first, embeddings)
    assert cache_file.is_file()
    # a second run's output folder gets its file although this process holds the entry
    other_run = tmp_path / "other" / "text.pt"
    third = cache.get(tiny.model, tiny.tokenizer, tiny.model_key, vocabulary, templates,
                      cache_file=other_run)
    assert third is first and cache.hits == 2 and other_run.is_file()

    def fail(*args, **kwargs):
        raise AssertionError("should have been read from the cache file")

    monkeypatch.setattr(text_module, "encode_vocabulary", fail)
    from_file = TextEmbeddingCache().get(tiny.model, tiny.tokenizer, tiny.model_key, vocabulary, templates, cache_file)
    torch.testing.assert_close(from_file, embeddings)
    with pytest.raises(AssertionError, match="cache file"):  # another vocabulary: file not reused
        TextEmbeddingCache().get(tiny.model, tiny.tokenizer, tiny.model_key, ["cat"], templates, cache_file)


def test_load_clip_sources(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        again = load_clip(TINY, None)
    assert "RANDOM weights" in caplog.text and not again.pretrained
    for a, b in zip(again.model.parameters(), tiny.model.parameters()):  # seeded random init
        torch.testing.assert_close(a, b)
    weights = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), weights)
    loaded = load_clip(TINY, str(weights))
    assert loaded.pretrained and str(weights) in loaded.model_key
    torch.testing.assert_close(loaded.model.visual.proj, tiny.model.visual.proj)
    with pytest.raises(ValueError, match="not a file, a 'local-dir:' folder, or an open_clip pretrained tag"):
        load_clip(TINY, "no-such-tag")
    with pytest.raises(ValueError, match="open_clip_config.json"):
        load_clip(TINY, f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match="ViT image tower"):
        load_clip("RN50", None)


def test_clip_proposer_returns_well_formed_deterministic_results(tiny):
    options = dict(
        model_name=TINY,
        vocabulary=["cat", "dog", "car"],
        background_words=["sky"],
        input_size=64,
        threshold=0.3,
        min_peak=0.34,
        min_area=4,
    )
    with pytest.raises(ValueError, match="no CLIP checkpoint given: random weights give meaningless"):
        build_proposer("clip", **options)
    proposer = build_proposer("clip", random_weights=True, **options)
    assert isinstance(proposer, ClipProposer) and proposer.embedding_dim == 32
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (64, 30, 3), dtype=np.uint8)]
    results = proposer.propose(images)
    assert len(results) == 2 and sum(len(r) for r in results) > 0
    for image, masks in zip(images, results):
        assert [m.score for m in masks] == sorted((m.score for m in masks), reverse=True)
        for m in masks:
            assert m.mask.dtype == bool and m.mask.shape == image.shape[:2] and m.mask.sum() >= 4
            assert m.label == proposer.vocabulary[m.label_index] and m.label != "sky"
            assert 0.0 <= m.score <= 1.0
            assert m.embedding.dtype == np.float32 and m.embedding.shape == (32,)
            assert abs(float(np.linalg.norm(m.embedding)) - 1.0) < 1e-5
    again = proposer.propose(images)
    assert [[(m.label_index, m.score) for m in r] for r in again] == [[(m.label_index, m.score) for m in r] for r in results]
    config = proposer.config()
    assert config["pretrained"] is False and config["vocabulary"] == ["cat", "dog", "car"]
    assert proposer.propose([]) == []
    with pytest.raises(ValueError, match="unexpected keyword"):
        build_proposer("clip", model_name=TINY, nonsense=1)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 0.0"):
        build_proposer("clip", model_name=TINY, threshold=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build_proposer("clip", model_name=TINY, temperature=0)
    with pytest.raises(ValueError, match="uint8"):
        proposer.propose([np.zeros((8, 8), dtype=np.uint8)])


def test_pretrained_tags_are_used_only_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    url_cfg = {"url": "https://example.invalid/clip/ViT-X.pt"}
    assert clip_dense._cached_tag_file(url_cfg) is None
    cached = tmp_path / ".cache" / "clip" / "ViT-X.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert clip_dense._cached_tag_file(url_cfg) == str(cached)
    assert clip_dense._cached_tag_file({"hf_hub": "uplvp-test/not-cached/"}) is None
    monkeypatch.setattr(clip_dense, "_cached_tag_file", lambda cfg: None)
    with pytest.raises(ValueError, match="not in the local cache and uplvp never downloads"):
        load_clip("ViT-B-16", "openai")


def test_vocabulary_defaults_and_checks():
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"
    assert all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)
    with pytest.raises(ValueError, match="entry 2 'cat' is a duplicate"):
        check_vocabulary(["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="entry 1 is blank"):
        check_vocabulary(["cat", " "])
    with pytest.raises(ValueError, match="exactly one"):
        check_templates(["a photo"])


def test_tokens_recipe_is_the_trained_forward_of_every_block(tiny):
    """recipe "tokens" = open_clip's own embedding and all blocks as trained, then ln_post and
    proj per patch; it differs from the value path."""
    visual = tiny.model.visual
    images = _images(4, 2, 32, 32)
    with torch.no_grad():
        x = visual._embeds(images)
        for block in visual.transformer.resblocks:
            x = block(x)
        expected = F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1)
        expected = expected.transpose(1, 2).reshape(2, -1, 2, 2)
        actual = dense_clip_features(tiny.model, images, recipe="tokens")
        value = dense_clip_features(tiny.model, images)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual, value, atol=1e-3)
    with pytest.raises(ValueError, match="dense recipe must be one of"):
        dense_clip_features(tiny.model, images, recipe="window")
