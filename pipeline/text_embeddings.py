"""The text embeddings a ``clip`` propose run leaves next to its shards, read for the text loss.

``OUT/text_embeddings.pt`` (docs/shards.md "Text embeddings"): a ``torch.save`` dict, read with
``weights_only=True``:

    format_version  1
    model_key       which CLIP weights encoded the text ("<model>|<checkpoint>")
    vocabulary      names: the proposer's vocabulary, then its background words
    templates       the prompt templates averaged per name
    embeddings      float32 [V, E], one L2-normalised row per name, in that order

Shard rows' ``label_index`` index the first part of that list (the vocabulary), so row i of
``embeddings`` is the text of ``label_index == i``; the background words stay in as extra
negatives of the softmax.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import InputError

TEXT_EMBEDDINGS_FILE = "text_embeddings.pt"
TEXT_EMBEDDINGS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TextVocabulary:
    """``names`` [V] and their ``embeddings`` float32 [V, E]; ``model_key`` of the CLIP."""

    names: list[str]
    embeddings: torch.Tensor
    model_key: str


def read_text_embeddings(shard_dir: str | Path) -> TextVocabulary:
    """``shard_dir/text_embeddings.pt`` validated; InputError (one line) when it is missing,
    unreadable or malformed."""
    path = Path(shard_dir) / TEXT_EMBEDDINGS_FILE
    if not path.is_file():
        raise InputError(
            "no text embeddings next to the shards: the text loss needs shards of "
            "'--proposer clip' (it writes text_embeddings.pt)", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise InputError(f"not a readable text-embeddings file ({type(err).__name__})",
                         path) from None
    if not isinstance(payload, dict):
        raise InputError("not a text-embeddings file (expected a dict)", path)
    if payload.get("format_version") != TEXT_EMBEDDINGS_FORMAT_VERSION:
        raise InputError(f"text-embeddings format_version {payload.get('format_version')!r} "
                         f"is not supported (expected {TEXT_EMBEDDINGS_FORMAT_VERSION})", path)
    names, embeddings = payload.get("vocabulary"), payload.get("embeddings")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise InputError("text-embeddings file: 'vocabulary' must be a non-empty list of names",
                         path)
    if (not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2
            or embeddings.shape[0] != len(names) or not embeddings.is_floating_point()):
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else None
        raise InputError(f"text-embeddings file: 'embeddings' must be float [{len(names)}, E], "
                         f"got {shape}", path)
    if not bool(torch.isfinite(embeddings).all()):
        raise InputError("text-embeddings file: 'embeddings' holds non-finite values", path)
    return TextVocabulary(list(names), embeddings.float(), str(payload.get("model_key", "")))


def check_shard_labels(vocabulary: TextVocabulary, shard_dir: str | Path,
                       masks_files: Sequence[Path]) -> None:
    """InputError unless the ``label_index`` -> ``label`` pairs of the first of ``masks_files``
    (the folder's ``masks/`` shard files, validated by the reader) that has rows are the
    file's names: the file must belong to these shards."""
    import pyarrow.parquet as pq

    for path in masks_files:
        table = pq.read_table(path, columns=["label", "label_index"])
        if table.num_rows == 0:
            continue
        pairs = set(zip(table["label_index"].to_pylist(), table["label"].to_pylist()))
        for index, label in sorted(pairs):
            if not 0 <= index < len(vocabulary.names) or vocabulary.names[index] != label:
                found = vocabulary.names[index] if 0 <= index < len(vocabulary.names) else None
                raise InputError(
                    f"{TEXT_EMBEDDINGS_FILE} does not belong to these shards: label_index "
                    f"{index} is {label!r} in {path.name} but {found!r} in the file",
                    Path(shard_dir) / TEXT_EMBEDDINGS_FILE)
        return
