"""CLIP text embeddings of a vocabulary, averaged over prompt templates, with caching.

Embeddings are float32 ``[K, E]`` CPU tensors (K vocabulary entries, E = CLIP joint-space
dim), each row L2-normalised. Each row is the normalised mean of the normalised embeddings of
``template.format(name)`` over the templates.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .vocabulary import check_templates, check_vocabulary

logger = logging.getLogger(__name__)

CACHE_FILE_FORMAT_VERSION = 1

CacheKey = tuple[str, tuple[str, ...], tuple[str, ...]]


@torch.inference_mode()
def encode_vocabulary(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    vocabulary: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Text embeddings of ``vocabulary`` (float32 ``[K, E]``, CPU, rows L2-normalised).

    model: an open_clip model with ``encode_text``; tokenizer: its tokenizer (strings -> int64
    ``[N, context_length]``). Prompts go through the text tower ``batch_size`` at a time on the
    model's device.
    """
    vocabulary = check_vocabulary(vocabulary)
    templates = check_templates(templates)
    prompts = [template.format(name) for name in vocabulary for template in templates]
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    per_prompt = torch.cat(chunks).reshape(len(vocabulary), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


class TextEmbeddingCache:
    """Text embeddings kept in memory per (model key, vocabulary, templates), optionally also in
    a ``.pt`` file (plain tensors and strings, read back with ``weights_only=True``).

    ``model_key`` must identify the weights (e.g. model name + checkpoint); two models with the
    same key share cache entries. ``hits``/``misses`` count in-memory lookups.
    """

    def __init__(self) -> None:
        self._entries: dict[CacheKey, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def get(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        model_key: str,
        vocabulary: Sequence[str],
        templates: Sequence[str],
        cache_file: str | Path | None = None,
    ) -> torch.Tensor:
        """Embeddings (float32 ``[K, E]``) from memory, else from ``cache_file`` when it holds
        the same key, else computed with :func:`encode_vocabulary`; ``cache_file`` (when
        given) holds them afterwards in every case. The returned tensor is shared: do not
        modify it."""
        key: CacheKey = (model_key, tuple(vocabulary), tuple(templates))
        if key in self._entries:
            self.hits += 1
            # the file is part of a run's output (the text loss reads it): write it even when
            # this process already holds the entry
            if cache_file is not None and load_cache_file(cache_file, key) is None:
                save_cache_file(cache_file, key, self._entries[key])
            return self._entries[key]
        self.misses += 1
        embeddings = load_cache_file(cache_file, key) if cache_file is not None else None
        if embeddings is None:
            embeddings = encode_vocabulary(model, tokenizer, vocabulary, templates)
            if cache_file is not None:
                save_cache_file(cache_file, key, embeddings)
        self._entries[key] = embeddings
        return embeddings


TEXT_EMBEDDING_CACHE = TextEmbeddingCache()
"""The process-wide cache the ``clip`` proposer uses by default."""


def save_cache_file(path: str | Path, key: CacheKey, embeddings: torch.Tensor) -> None:
    """Write ``embeddings`` and the key they belong to into ``path`` (temporary file, then
    rename, so a killed write never leaves a truncated cache file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": CACHE_FILE_FORMAT_VERSION,
        "model_key": key[0],
        "vocabulary": list(key[1]),
        "templates": list(key[2]),
        "embeddings": embeddings.detach().cpu().float(),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_cache_file(path: str | Path, key: CacheKey) -> torch.Tensor | None:
    """Embeddings stored in ``path`` for exactly ``key``; ``None`` when the file is missing,
    unreadable, of another format version, or holds another key (logged)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt cache file is recomputed, never fatal
        logger.warning("ignoring unreadable text-embedding cache %s: %s", path, err)
        return None
    if not isinstance(payload, dict) or payload.get("format_version") != CACHE_FILE_FORMAT_VERSION:
        logger.info("text-embedding cache %s has another format; recomputing", path)
        return None
    stored_key = (
        payload.get("model_key"),
        tuple(payload.get("vocabulary", ())),
        tuple(payload.get("templates", ())),
    )
    if stored_key != key:
        logger.info("text-embedding cache %s holds another model/vocabulary; recomputing", path)
        return None
    embeddings = payload.get("embeddings")
    if not isinstance(embeddings, torch.Tensor) or embeddings.shape[0] != len(key[1]):
        logger.warning("ignoring malformed text-embedding cache %s", path)
        return None
    return embeddings.float()
