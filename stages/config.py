"""Typed stage configs: YAML file + CLI overrides -> one validated pydantic object.

Precedence: defaults < ``--config FILE.yaml`` < explicit CLI options < ``--set key=value``. Unknown keys are errors
(a typo in a YAML file must not be silently ignored). Each stage defines one ``StageConfig``
subclass; ``HASH_EXCLUDE`` names the fields that do not change outputs (workers, progress bars)
and so are left out of the config hash that marks completed work.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import InputError
from pipeline.manifest import first_validation_error


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    HASH_EXCLUDE: ClassVar[frozenset[str]] = frozenset()

    def resolved(self) -> dict[str, Any]:
        """All fields as JSON-compatible values (paths as strings)."""
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        """sha256 (first 16 hex) of the canonical JSON of the output-relevant fields."""
        relevant = {k: v for k, v in self.resolved().items() if k not in self.HASH_EXCLUDE}
        blob = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


C = TypeVar("C", bound=StageConfig)


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` items -> ``{key: value}``; the value is read as YAML (``1e-3``,
    ``true``, ``[1, 2]``, ``null``; anything else stays a string). One :class:`InputError`
    line for an item without ``=`` or a value that is not valid YAML."""
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise InputError(f"--set {item!r}: expected key=value (dotted keys for sections, "
                             f"e.g. train.lr=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise InputError(f"--set {item!r}: the value is not valid YAML") from None
        values[key.strip()] = _number(value)
    return values


def _number(value: Any) -> Any:
    """A string that Python reads as a number, as that number (YAML 1.1 reads ``1e-3``, with
    no dot, as a string)."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def load_config(cls: type[C], config_file: Path | None, overrides: dict[str, Any],
                sets: list[str] | None = None) -> C:
    """Build ``cls`` from an optional YAML file, then apply the non-None ``overrides`` (the
    named CLI options), then the ``--set key=value`` items (any field, also one without a
    named option).

    A key ``"train.max_steps"`` sets field ``max_steps`` of the nested section ``train``
    (keeping the section's other values from the file)."""
    values: dict[str, Any] = {}
    source = "command line"
    if config_file is not None:
        source = str(config_file)
        if not Path(config_file).is_file():
            raise InputError("config file not found", config_file)
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raise InputError("not valid YAML", config_file) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError("a config file must be a YAML mapping of option: value", config_file)
        values.update(loaded)
    for key, value in overrides.items():
        if value is not None:
            _set_dotted(values, key, value)
    for key, value in parse_sets(sets).items():
        _set_dotted(values, key, value)
    _fill_section_defaults(cls, values)
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise InputError(f"config: {first_validation_error(err)}", source) from None


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = values
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else dict(child)
            node[part] = child
        node = child
    node[leaf] = value


def _fill_section_defaults(cls: type[StageConfig], values: dict[str, Any]) -> None:
    """A nested section given partly (``train: {lr: 1e-3}``) keeps the defaults of the fields
    it does not name, instead of failing on them."""
    for name, field in cls.model_fields.items():
        default = field.default
        if isinstance(default, BaseModel) and isinstance(values.get(name), dict):
            values[name] = {**default.model_dump(), **values[name]}
