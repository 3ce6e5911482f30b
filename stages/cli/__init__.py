"""The `uplvp` command line (typer).

    uplvp stage propose|pretrain|finetune|evaluate   the pipeline stages
    uplvp data synth|split|convert|check             datasets
    uplvp inspect masks|overlay|run                  look at stage outputs
    uplvp predict                                    inference on new images
    uplvp export                                     a fine-tuned checkpoint to ONNX
    uplvp demo                                       the whole pipeline on embedded demo data

Every command reads ``--config FILE.yaml`` and CLI options into one typed config; bad input
prints one ``error: ...`` line on stderr and exits with code 2.
"""
from __future__ import annotations

# importing the command modules registers their commands on the apps of common.py
from stages.cli import data_commands, inspect_commands, run_commands, stage_commands  # noqa: F401
from stages.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app(prog_name="uplvp")
