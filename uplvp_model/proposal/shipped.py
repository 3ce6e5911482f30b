"""Language-vision models that ship with the package, selected by name the way open_clip names
its pretrained tags: ``--clip-model uplvp-synth-vit`` with no checkpoint path.

Each shipped model is a folder ``uplvp_model/proposal/shipped_models/<name>/`` holding

- ``open_clip_config.json``: the open_clip model config (``model_cfg``, as open_clip's
  ``local-dir:`` folders hold it);
- ``card.yaml``: what it is (a free-text ``description``), ``weights`` (the file name),
  ``sha256`` of that file, ``precision`` (``fp16``), ``vocabulary`` (category names), the
  training ``command`` and its ``data_seeds``, and ``format_version`` 1;
- the weights file named by the card, ``open_clip_model.safetensors`` (the folder is an open_clip
  ``local-dir:`` folder, which ``load_clip`` builds).

A card whose weights file is absent or whose sha256 differs gives one ``ValueError`` line; a
name that is not shipped is left to open_clip (``is_shipped`` is False).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_models"
CARD_FILE = "card.yaml"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
CARD_VERSION = 1
CARD_KEYS = ("format_version", "description", "weights", "sha256", "precision", "vocabulary",
             "command", "data_seeds")


@dataclass(frozen=True)
class ShippedModel:
    name: str
    folder: Path
    card: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.folder / self.card["weights"]

    @property
    def vocabulary(self) -> list[str]:
        return list(self.card["vocabulary"])


def shipped_names(root: Path | None = None) -> list[str]:
    """Names of the shipped models (folders with a card), sorted."""
    root = SHIPPED_DIR if root is None else root
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CARD_FILE).is_file())


def is_shipped(name: str, root: Path | None = None) -> bool:
    return name in shipped_names(root)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_model(name: str, root: Path | None = None, verify: bool = True) -> ShippedModel:
    """The shipped model ``name``, its card validated and (``verify``) its weights' sha256
    checked. Raises ``ValueError`` with one line naming the file and what is wrong."""
    root = SHIPPED_DIR if root is None else root
    folder = root / name
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        known = ", ".join(shipped_names(root)) or "none"
        raise ValueError(f"no shipped CLIP model {name!r} (shipped: {known})")
    card = yaml.safe_load(card_path.read_text())
    if not isinstance(card, dict):
        raise ValueError(f"{card_path}: not a mapping")
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise ValueError(f"{card_path}: missing keys {', '.join(missing)}")
    if card["format_version"] != CARD_VERSION:
        raise ValueError(f"{card_path}: format_version {card['format_version']!r} is not "
                         f"{CARD_VERSION}")
    if card["weights"] != WEIGHTS_FILE:
        raise ValueError(f"{card_path}: weights must be {WEIGHTS_FILE!r} (the file open_clip's "
                         f"'local-dir:' loading reads), got {card['weights']!r}")
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{folder / CONFIG_FILE}: not found (the model's open_clip config)")
    model = ShippedModel(name, folder, card)
    if verify:
        if not model.weights.is_file():
            raise ValueError(f"{model.weights}: the weights of shipped model {name!r} are missing "
                             "from this installation")
        actual = file_sha256(model.weights)
        if actual != card["sha256"]:
            raise ValueError(f"{model.weights}: sha256 {actual} does not match the card's "
                             f"{card['sha256']} (a damaged or replaced file)")
    return model
