"""Typed stage configs: YAML file + CLI overrides -> one validated pydantic object.

Precedence: defaults < ``--config FILE.yaml`` < explicit CLI options. Unknown keys are errors
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


def load_config(cls: type[C], config_file: Path | None, overrides: dict[str, Any]) -> C:
    """Build ``cls`` from an optional YAML file, then apply the non-None ``overrides``."""
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
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise InputError(f"config: {first_validation_error(err)}", source) from None
