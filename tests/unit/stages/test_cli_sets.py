"""`--set key=value`: any config field from the command line, applied last."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.errors import InputError
from stages.cli import app
from stages.config import load_config, parse_sets
from stages.finetune import FinetuneConfig

runner = CliRunner()


def test_values_are_read_as_yaml():
    assert parse_sets(["a=1", "b.c=1e-3", "d=true", "e=[1, 2]", "f=null", "g=some text",
                       "h="]) == {"a": 1, "b.c": 0.001, "d": True, "e": [1, 2], "f": None,
                                  "g": "some text", "h": ""}


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1", "a=[1,"])
def test_a_malformed_item_is_one_error(item):
    with pytest.raises(InputError, match="--set"):
        parse_sets([item])


def test_set_wins_over_the_file_and_the_named_options(tmp_path):
    config = tmp_path / "finetune.yaml"
    config.write_text("train_data: a.yaml\nout: runs/x\ntrain: {max_steps: 50, lr: 1.0e-4}\n")
    cfg = load_config(FinetuneConfig, config, {"train.lr": 5e-4},
                      ["train.lr=2e-3", "importance_sample_ratio=0.75",
                       "model.overrides={dropout: 0.1}"])
    assert cfg.train.lr == 0.002 and cfg.train.max_steps == 50  # the file's other value kept
    assert cfg.importance_sample_ratio == 0.75  # a field without a named option
    assert cfg.model.overrides == {"dropout": 0.1}


def test_the_command_line_reaches_the_config(tmp_path):
    args = ["stage", "evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data",
            str(tmp_path / "none.yaml"), "--out", str(tmp_path / "eval")]
    result = runner.invoke(app, args + ["--set", "batch_size=0"])
    assert result.exit_code == 2 and "--batch-size must be >= 1" in result.output
    result = runner.invoke(app, args + ["--set", "no_such_field=1"])
    assert result.exit_code == 2
    assert "no_such_field: unknown field" in " ".join(result.output.split())
