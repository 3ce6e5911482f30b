"""stages/cli/options.py: each option reaches the config field it names, declared once."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import typer
from typer.testing import CliRunner

from stages.cli.options import PROGRESS, RUN, Given, config_options

runner = CliRunner()


def toy_app(seen: list):
    app = typer.Typer()

    @app.command("run")
    @config_options(RUN, PROGRESS, keys={"strategy": "prompt.strategy", "raw": None})
    def run(
        images: Optional[Path] = typer.Option(None, "--images"),
        strategy: Optional[str] = typer.Option(None, "--strategy"),
        raw: Optional[str] = typer.Option(None, "--raw"),
        *,
        given: Given,
    ) -> None:
        seen.append((images, raw, given))

    @app.command("other")
    def other() -> None:
        """Keeps typer's command names."""

    return app


def test_own_and_shared_options_reach_their_config_keys(tmp_path):
    seen: list = []
    result = runner.invoke(toy_app(seen), [
        "run", "--images", "m.yaml", "--strategy", "cosine", "--raw", "x", "--seed", "3",
        "--on-nan", "stop", "--out", "runs/a", "--config", str(tmp_path / "c.yaml"),
        "--set", "train.lr=1e-3", "--no-progress"])
    assert result.exit_code == 0, result.output
    images, raw, given = seen[0]
    assert (images, raw) == (Path("m.yaml"), "x")  # the command still gets its own values
    assert given.overrides == {
        "images": Path("m.yaml"), "prompt.strategy": "cosine",  # "raw" is not a config field
        "out": Path("runs/a"), "data.num_workers": None, "data.seed": 3, "device": None,
        "resume": None, "train.on_nan": "stop", "train.checkpoint_every": None}
    assert given.config_file == tmp_path / "c.yaml" and given.sets == ["train.lr=1e-3"]
    assert given.progress is False


def test_the_shared_options_are_in_the_help_after_the_commands_own():
    result = runner.invoke(toy_app([]), ["run", "--help"], env={"COLUMNS": "200"})
    order = [name for name in ("--images", "--raw", "--out", "--seed", "--config", "--set",
                               "--no-progress") if name in result.output]
    assert order == ["--images", "--raw", "--out", "--seed", "--config", "--set", "--no-progress"]
    assert [result.output.index(n) for n in order] == sorted(
        result.output.index(n) for n in order)


def test_an_option_declared_twice_is_refused():
    with pytest.raises(TypeError, match=r"\['seed'\] declared twice"):
        @config_options(RUN)
        def run(seed: Optional[int] = typer.Option(None), *, given: Given) -> None:
            pass
