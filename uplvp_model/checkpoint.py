"""Model checkpoint I/O: atomic ``weights_only``-safe saving, partial loading with a report,
and backbone-weight import (torchvision, MoCo v2, mmdet-style prefixes).

Checkpoint file (``torch.save``, loadable with ``torch.load(path, weights_only=True)``)::

    {"format_version": 1, "model": {state-dict key: Tensor}, **extra}

``extra`` holds only tensors and plain Python values (None, bool, int, float, str, bytes and
lists / tuples / dicts of them), e.g. optimizer and scheduler state, step, RNG states, config.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

CHECKPOINT_FORMAT_VERSION = 1
RESERVED_KEYS = ("format_version", "model")
# the backbone stage's export in its run folder (docs/backbone.md); a folder given as a backbone
# checkpoint means this file in it
BACKBONE_FILE = "backbone.pt"

# Prefixes tried in order; the first one that some key starts with selects the backbone keys.
BACKBONE_PREFIXES = (
    "backbone.body.",  # a uplvp model checkpoint
    "module.encoder_q.",  # MoCo v1/v2 (DistributedDataParallel)
    "encoder_q.",
    "module.backbone.",
    "backbone.",  # mmdetection / detectron-style detector checkpoints
    "module.",
)
_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)
_PLAIN_CONTAINERS = (list, tuple, torch.Size, dict, OrderedDict)


@dataclass
class LoadReport:
    """What a partial load did, by state-dict key (each list sorted).

    loaded: copied into the model. missing: model keys the source lacks (left as they were).
    unexpected: source keys the model lacks. skipped: keys in both with different shapes (left
    as they were; ``skipped_shapes[key] = (source shape, model shape)``). ignored: source keys
    dropped before matching (backbone import only: other prefixes, ``fc.``, non-tensors).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    skipped_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=dict)

    def summary(self) -> str:
        """One line with counts, then the non-empty missing/unexpected/skipped key lists."""
        lines = [f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected "
                 f"{len(self.unexpected)}, skipped (shape mismatch) {len(self.skipped)}, "
                 f"ignored {len(self.ignored)}"]
        if self.missing:
            lines.append("missing: " + ", ".join(self.missing))
        if self.unexpected:
            lines.append("unexpected: " + ", ".join(self.unexpected))
        for key in self.skipped:
            src, dst = self.skipped_shapes[key]
            lines.append(f"skipped: {key} checkpoint {list(src)} vs model {list(dst)}")
        return "\n".join(lines)

    def misfit(self, allowed: Sequence[str] = ()) -> str | None:
        """One line on the model tensors the source did not provide or gave with another shape
        (keys in ``allowed`` excepted, and BatchNorm ``num_batches_tracked`` counters, which a
        frozen-BatchNorm source does not have), or None when everything fits."""
        skipped = [k for k in self.skipped if k not in set(allowed)]
        missing = [k for k in self.missing if k not in set(allowed)
                   and k.rpartition(".")[2] != "num_batches_tracked"]
        parts = []
        if missing:
            parts.append(f"{len(missing)} model tensors missing (first: {missing[0]})")
        if skipped:
            src, dst = self.skipped_shapes[skipped[0]]
            parts.append(f"{len(skipped)} of another shape (first: {skipped[0]} checkpoint "
                         f"{list(src)} vs model {list(dst)})")
        return ", ".join(parts) if parts else None


def load_model_state(model: nn.Module, state_dict: Mapping[str, Tensor],
                     skip_mismatched: bool = True) -> LoadReport:
    """Copy the tensors of ``state_dict`` whose key and shape match ``model.state_dict()``.

    With ``skip_mismatched=False`` a shape mismatch raises ``ValueError`` (naming the keys)
    before anything is copied. Example: loading a 1-class pre-trained checkpoint into an
    80-class fine-tuning model skips exactly the class-head weights and biases.
    """
    own = model.state_dict()
    report = LoadReport()
    to_load: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.skipped.append(key)
            report.skipped_shapes[key] = (tuple(value.shape), tuple(own[key].shape))
        else:
            to_load[key] = value
    report.missing = [key for key in own if key not in state_dict]
    if report.skipped and not skip_mismatched:
        raise ValueError("checkpoint tensors with mismatched shapes: " + "; ".join(
            f"{k} {list(src)} vs model {list(dst)}"
            for k, (src, dst) in sorted(report.skipped_shapes.items())))
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing.sort()
    report.unexpected.sort()
    report.skipped.sort()
    return report


def _check_plain(value: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if ``value`` holds anything but tensors and plain
    Python values (exact types: numpy scalars and arrays, dataclasses, ... are rejected)."""
    if isinstance(value, Tensor) or type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in _PLAIN_SCALARS:
                raise ValueError(f"checkpoint extra {where}: key {key!r} is not a plain value")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in _PLAIN_CONTAINERS:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise ValueError(
        f"checkpoint extra {where}: {type(value).__module__}.{type(value).__qualname__} is not a "
        "tensor or plain Python value (convert it, e.g. numpy array -> torch.as_tensor or list)"
    )


def save_model_state(path: str | Path, model: nn.Module, extra: dict[str, Any]) -> None:
    """Write ``{"format_version", "model": model.state_dict(), **extra}`` to ``path`` atomically
    (temporary file in the same folder, fsync, ``os.replace``).

    ``extra`` must not use the keys ``format_version`` / ``model`` and must hold only tensors
    and plain Python values (else ``ValueError`` before anything is written), so that
    ``torch.load(path, weights_only=True)`` reads the file back.
    """
    save_state(path, model.state_dict(), extra)


def save_state(path: str | Path, state: Mapping[str, Tensor], extra: dict[str, Any]) -> None:
    """:func:`save_model_state` of a ready state dict ``state``."""
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"checkpoint extra uses reserved key(s): {', '.join(clash)}")
    _check_plain(extra, "extra")
    payload = {"format_version": CHECKPOINT_FORMAT_VERSION, "model": dict(state), **extra}
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True, map_location="cpu")`` of a file written by
    :func:`save_model_state`; raises ``ValueError`` naming the file if it is missing, unreadable,
    or has no ``model`` state or another ``format_version``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):  # every torch.save since torch 1.6 writes a zip archive
        raise ValueError(f"{path}: not a checkpoint (not a file written by torch.save)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / unsafe files
        raise ValueError(f"{path}: not a readable checkpoint ({_load_reason(err)})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise ValueError(f"{path}: not a uplvp checkpoint (no 'model' state dict)")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {payload.get('format_version')!r} is not "
                         f"{CHECKPOINT_FORMAT_VERSION}")
    return payload


def _load_reason(err: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` failed, without torch's advice to
    turn ``weights_only`` off (that would run arbitrary code from the file)."""
    if "weights_only" in str(err) or type(err).__name__ == "UnpicklingError":
        return "it holds objects other than tensors and plain values"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0][:200] if lines else type(err).__name__)


def map_backbone_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a foreign checkpoint's keys to torchvision ResNet names.

    Chooses the first of :data:`BACKBONE_PREFIXES` that some key starts with (none: keys are
    taken as is), strips it, and drops (returns in the second list, sorted) keys without that
    prefix (e.g. ``module.encoder_k.*``, ``queue``, ``neck.*``), classifier / projection-head
    keys (``fc.*``) and non-tensor values.
    """
    prefix = next((p for p in BACKBONE_PREFIXES if any(k.startswith(p) for k in state_dict)), "")
    mapped: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state_dict.items():
        name = key[len(prefix):]
        if not key.startswith(prefix) or name.startswith("fc.") or not isinstance(value, Tensor):
            ignored.append(key)
        else:
            mapped[name] = value
    return mapped, sorted(ignored)


def resolve_backbone_path(path: str | Path) -> Path:
    """``path``, or ``path/backbone.pt`` when ``path`` is a folder (a backbone stage's run)."""
    path = Path(path)
    return path / BACKBONE_FILE if path.is_dir() else path


def read_backbone_file(path: str | Path) -> tuple[Path, dict]:
    """(resolved path, ``torch.load(weights_only=True)`` payload) of a backbone checkpoint;
    ``ValueError`` naming the file when it is missing, unreadable or not a dict."""
    path = resolve_backbone_path(path)
    if not path.is_file():
        raise ValueError(f"{path}: backbone checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / unsafe files
        raise ValueError(f"{path}: not a readable backbone checkpoint ({_load_reason(err)})"
                         ) from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: backbone checkpoint is a {type(payload).__name__}, not a dict")
    return path, payload


def backbone_checkpoint_name(path: str | Path) -> str | None:
    """The backbone architecture a checkpoint names (``"backbone"`` of a backbone stage's
    ``backbone.pt``: ``tiny`` | ``resnet18`` | ``resnet50``), None for foreign files."""
    _, payload = read_backbone_file(path)
    name = payload.get("backbone")
    return name if isinstance(name, str) else None


def load_backbone_checkpoint(body: nn.Module, path: str | Path,
                             allow_partial: bool = False) -> LoadReport:
    """Load backbone weights from a local file into ``body`` (the backbone's weight module).

    ``path``: a file, or a backbone stage's run folder (its ``backbone.pt``). The file is read with ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper is unwrapped; keys are mapped with :func:`map_backbone_keys`.
    Every tensor of ``body`` must come from the file with its shape (extra tensors in the
    file, e.g. a deeper level than ``body`` has, are reported as unexpected and left out):
    otherwise ``ValueError`` naming the file and what did not fit (another depth or width),
    unless ``allow_partial``, which loads what fits and reports the rest. ``ValueError`` also
    when the file cannot be read or not a single tensor matched.
    """
    path, payload = read_backbone_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(payload.get(wrapper), dict):
            payload = payload[wrapper]
            break
    mapped, ignored = map_backbone_keys(payload)
    report = load_model_state(body, mapped, skip_mismatched=True)
    report.ignored = ignored
    if not report.loaded:
        raise ValueError(f"{path}: no tensor of the backbone checkpoint matched the model "
                         f"backbone ({report.summary().splitlines()[0]})")
    misfit = report.misfit()
    if misfit and not allow_partial:
        raise ValueError(f"{path}: backbone checkpoint does not fit the model's backbone: "
                         f"{misfit}; another depth or width? (allow_partial_init loads only "
                         f"what fits)")
    return report
