"""Each stage command's help lists every field of its stage config, generated from the config.

The named options of a command cover the common fields; ``--config`` and ``--set key=value``
reach all of them. So that a field added to a stage config shows in ``--help`` and in
``docs/cli.md`` without being copied by hand, the command's epilog is built from the pydantic
config class when help is rendered (not at start-up: the configs import torch, and ``uplvp``
starts without it).
"""
from __future__ import annotations

import importlib
import types
import typing
from typing import Any

from pydantic import BaseModel
from typer.core import TyperCommand


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config class of a section field (``X`` or ``X | None``), else None."""
    candidates = typing.get_args(annotation) if isinstance(
        annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _choices(annotation: Any) -> str:
    """`` (a|b)`` for a Literal field, else empty (the default shows the type)."""
    if typing.get_origin(annotation) is typing.Literal:
        return " (" + "|".join(str(v) for v in typing.get_args(annotation)) + ")"
    return ""


def config_fields(cls: type[BaseModel], prefix: str = "",
                  defaults: BaseModel | None = None) -> list[tuple[str, str, str]]:
    """``(section, field, default)`` for every leaf field of ``cls``, sections recursed into
    with the section default the parent config sets (e.g. fine-tuning's own ``train`` steps)."""
    rows = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        if field.is_required():
            default: Any = "required"
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = field.default
        if defaults is not None:
            default = getattr(defaults, name, default)
        section = _section(field.annotation)
        if section is not None and (default is None or isinstance(default, BaseModel)):
            rows += config_fields(section, f"{key}.", default)
            continue
        shown = default if default == "required" else repr(
            str(default) if hasattr(default, "as_posix") else default)
        rows.append((prefix.rstrip("."), name, f"{shown}{_choices(field.annotation)}"))
    return rows


def fields_epilog(cls: type[BaseModel]) -> str:
    """The epilog: a paragraph per config section, ``field=default`` for each of its fields."""
    sections: dict[str, list[str]] = {}
    for section, name, default in config_fields(cls):
        sections.setdefault(section, []).append(f"{name}={default}")
    paragraphs = [f"Every field of {cls.__name__} (set with --config FILE or --set key=value; "
                  f"a section's fields as section.field), with its default:"]
    paragraphs += [f"{section or 'top level'}: " + ", ".join(fields)
                   for section, fields in sections.items()]
    return "\n\n".join(paragraphs)


def config_command(ref: str) -> type[TyperCommand]:
    """A typer command class whose epilog lists the fields of ``ref`` (``module:Class``),
    imported the first time the epilog is read."""

    class ConfigCommand(TyperCommand):
        config_ref = ref
        _generated: str | None = None

        @property
        def epilog(self) -> str:
            if ConfigCommand._generated is None:
                module, _, name = self.config_ref.partition(":")
                ConfigCommand._generated = fields_epilog(
                    getattr(importlib.import_module(module), name))
            return ConfigCommand._generated

        @epilog.setter
        def epilog(self, value: str | None) -> None:  # typer passes None; the fields replace it
            pass

    return ConfigCommand
