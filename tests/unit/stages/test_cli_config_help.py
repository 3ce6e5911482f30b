"""Each stage command's help lists every field of its config, generated from the config class."""
from __future__ import annotations

import re
from typing import Literal

import pytest
import typer
from pydantic import BaseModel
from typer.main import get_command
from typer.testing import CliRunner

from stages.cli import app
from stages.cli.config_help import config_command, config_fields, fields_epilog

runner = CliRunner()


class ToySection(BaseModel):
    lr: float = 1e-4
    schedule: Literal["cosine", "step"] = "cosine"


class ToyConfig(BaseModel):
    out: str
    steps: int = 10
    train: ToySection = ToySection(lr=0.5)


def test_the_fields_of_a_planted_config():
    assert config_fields(ToyConfig) == [
        ("", "out", "required"), ("", "steps", "10"),
        ("train", "lr", "0.5"),  # the parent's section default, not the section class's
        ("train", "schedule", "'cosine' (cosine|step)")]
    assert fields_epilog(ToyConfig).split("\n\n")[1:] == [
        "top level: out=required, steps=10", "train: lr=0.5, schedule='cosine' (cosine|step)"]


def test_a_field_added_to_a_config_shows_in_the_help_without_being_declared():
    toy = typer.Typer()

    @toy.command("run", cls=config_command(f"{__name__}:ToyConfig"))
    def run(sets: list[str] = typer.Option(None, "--set")) -> None:
        """A toy stage."""

    @toy.command("other")
    def other() -> None:
        """Needed for typer to keep the command name."""

    before = runner.invoke(toy, ["run", "--help"], env={"COLUMNS": "200"})
    assert "steps=10" in before.output and "warmup" not in before.output

    class ToyConfigV2(ToyConfig):
        warmup: int = 7

    globals()["ToyConfigV2"] = ToyConfigV2
    try:
        @toy.command("run2", cls=config_command(f"{__name__}:ToyConfigV2"))
        def run2() -> None:
            """The same stage with one more config field."""

        after = runner.invoke(toy, ["run2", "--help"], env={"COLUMNS": "200"})
    finally:
        del globals()["ToyConfigV2"]
    assert "warmup=7" in after.output and "steps=10" in after.output


def config_commands() -> list[tuple[str, typer.core.TyperCommand]]:
    found = []

    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])
        if getattr(command, "config_ref", None):
            found.append((" ".join(path), command))

    walk(get_command(app), [])
    return found


def test_every_stage_command_has_its_config_help():
    names = {name for name, _ in config_commands()}
    assert {"stage propose", "stage backbone", "stage pretrain", "stage finetune",
            "stage evaluate", "predict", "demo", "export", "data synth", "data split"} <= names


@pytest.mark.parametrize("name,command", config_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_default_written_in_an_option_help_is_the_configs(name, command):
    """Where an option's help text still states a default, it is the config's (the text is
    hand-written; the config is the truth)."""
    fields: dict[str, list[str]] = {}
    for _, field, default in config_fields(_config_class(command)):
        fields.setdefault(field, []).append(default.split(" (")[0])
    ctx = typer.Context(command)
    checked = 0
    for param in command.get_params(ctx):
        stated = re.search(r"\(default:? ([^;)]+?)\)", param.help or "")
        field = {"backbone_lr_mult": "backbone_lr_multiplier"}.get(param.name, param.name)
        if not stated or len(fields.get(field, [])) != 1 or not _literal(stated.group(1)):
            continue  # prose ("the 80 COCO names") describes a None default; not compared
        assert _same(stated.group(1), fields[field][0]), (name, param.name, stated.group(1),
                                                          fields[field][0])
        checked += 1
    if name in ("stage pretrain", "stage finetune"):
        assert checked >= 3  # batch size, lr, workers, seed, accumulation steps


def _config_class(command):
    import importlib

    module, _, cls = command.config_ref.partition(":")
    return getattr(importlib.import_module(module), cls)


def _literal(stated: str) -> bool:
    """A number or one word: a value the config's default can be compared with."""
    try:
        float(stated)
        return True
    except ValueError:
        return re.fullmatch(r"[A-Za-z_][\w.-]*", stated.strip()) is not None and stated not in (
            "on", "off")


def _same(stated: str, default: str) -> bool:
    stated, default = stated.strip().strip("'"), default.strip("'")
    if default.startswith("[") and "," not in default:  # a one-item list option
        default = default.strip("[]").strip("'")
    try:
        return float(stated) == float(default)
    except ValueError:
        return stated == default
