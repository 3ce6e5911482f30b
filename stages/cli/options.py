"""How a command's options reach its stage config, declared once.

Every option of a stage command sets one config field: by default the field of its own name,
else the dotted key given in ``keys`` (``strategy`` -> ``prompt.strategy``). Options that several
commands share (``--config``, ``--set``, ``--no-progress``, the run and training options) are
declared once here, with their keys, and added to a command's signature by
:func:`config_options`; the command receives :class:`Given`, whose ``load`` builds the config:
the YAML file, then every option the user gave, then the ``--set`` items.
"""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from stages.cli.common import (
    AccumulationOpt,
    AllowPartialInitOpt,
    AmpOpt,
    BackboneLrOpt,
    BatchSizeOpt,
    CheckpointEveryOpt,
    ConfigOpt,
    DecoderOpt,
    DeviceOpt,
    LrOpt,
    NoProgressOpt,
    NormOpt,
    NumWorkersOpt,
    OnNanOpt,
    PresetOpt,
    ResumeOpt,
    RunOutOpt,
    SeedOpt,
    SetOpt,
)
from stages.config import load_config


@dataclass(frozen=True)
class Shared:
    """An option several commands share: its parameter name, type, typer option and config key
    (None: it is not a config field)."""

    name: str
    annotation: Any
    option: Any
    key: str | None


# --config / --set: every config command; --no-progress: commands that report progress
CONFIG = (Shared("config", Optional[Path], ConfigOpt, None),
          Shared("sets", Optional[list[str]], SetOpt, None))
PROGRESS = (Shared("no_progress", bool, NoProgressOpt, None),)
DEVICE = (Shared("device", Optional[str], DeviceOpt, "device"),)
# a training run: the backbone stage, pretrain and finetune
RUN = (
    Shared("out", Optional[Path], RunOutOpt, "out"),
    Shared("num_workers", Optional[int], NumWorkersOpt, "data.num_workers"),
    Shared("seed", Optional[int], SeedOpt, "data.seed"),
    *DEVICE,
    Shared("resume", Optional[bool], ResumeOpt, "resume"),
    Shared("on_nan", Optional[str], OnNanOpt, "train.on_nan"),
    Shared("checkpoint_every", Optional[int], CheckpointEveryOpt, "train.checkpoint_every"),
)
# the QEIS model's training: pretrain and finetune
MODEL_TRAINING = (
    Shared("preset", Optional[str], PresetOpt, "model.preset"),
    Shared("decoder", Optional[str], DecoderOpt, "model.decoder"),
    Shared("norm", Optional[str], NormOpt, "model.norm"),
    Shared("allow_partial_init", Optional[bool], AllowPartialInitOpt, "model.allow_partial_init"),
    Shared("backbone_lr_mult", Optional[float], BackboneLrOpt, "train.backbone_lr_multiplier"),
    Shared("batch_size", Optional[int], BatchSizeOpt, "data.batch_size"),
    Shared("lr", Optional[float], LrOpt, "train.lr"),
    Shared("amp", Optional[str], AmpOpt, "train.amp"),
    Shared("accumulation_steps", Optional[int], AccumulationOpt, "train.accumulation_steps"),
)


@dataclass
class Given:
    """What the user gave a command: option values by config key, the YAML file, ``--set``."""

    overrides: dict[str, Any] = field(default_factory=dict)
    config_file: Path | None = None
    sets: list[str] | None = None
    progress: bool = True

    def load(self, cls: type, **extra: Any) -> Any:
        """The stage config: ``--config`` file, then the options given (and ``extra``), then
        ``--set``; options left at None keep the file's or the config's value."""
        return load_config(cls, self.config_file, {**self.overrides, **extra}, self.sets)


def config_options(*groups: tuple[Shared, ...], keys: dict[str, str | None] | None = None
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a command: adds the shared options of ``groups`` (after its own) and
    calls it with ``given=Given(...)`` instead of the option values it does not declare.

    ``keys`` maps an own parameter to its config key when that is not the parameter's name,
    or to None when the parameter is not a config field (the command reads it itself; it is
    still passed to the command)."""
    # in the help: the command's own options, the groups', then --config, --set, --no-progress
    ordered = [g for g in groups if g is not PROGRESS] + [CONFIG] + [g for g in groups if g is PROGRESS]
    shared = [s for group in ordered for s in group]
    keys = keys or {}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.name != "given"]
        names = {p.name for p in own}
        clash = names & {s.name for s in shared}
        if clash:
            raise TypeError(f"{fn.__name__}: {sorted(clash)} declared twice")
        added = [inspect.Parameter(s.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                   default=s.option, annotation=s.annotation) for s in shared]

        @functools.wraps(fn)
        def command(**values: Any) -> Any:
            given = Given(config_file=values.get("config"), sets=values.get("sets"),
                          progress=not values.get("no_progress", False))
            for s in shared:
                value = values.pop(s.name)
                if s.key is not None:
                    given.overrides[s.key] = value
            for name, value in values.items():
                key = keys.get(name, name)
                if key is not None:
                    given.overrides[key] = value
            return fn(**values, given=given)

        parameters = own + added
        command.__signature__ = inspect.Signature(parameters, return_annotation=None)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return decorate

