"""The typer apps and the options the commands share (their defaults live in the stage configs)."""
from __future__ import annotations

from importlib import metadata
import typer

app = typer.Typer(
    name="uplvp",
    help="UPLVP: unsupervised pre-training with language-vision prompts for low-data "
    "instance segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
stage_app = typer.Typer(help="Pipeline stages (each reruns alone and resumes).", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: demo data, low-data splits, converters.", no_args_is_help=True)
convert_app = typer.Typer(help="Convert other formats to COCO instances JSON.", no_args_is_help=True)
inspect_app = typer.Typer(help="Inspect stage outputs.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(data_app, name="data")
data_app.add_typer(convert_app, name="convert")
app.add_typer(inspect_app, name="inspect")

ConfigOpt = typer.Option(None, "--config", help="YAML file of options; CLI options override it.")
SetOpt = typer.Option(
    None, "--set", metavar="KEY=VALUE",
    help="Any config field, also one without an option here: key=value, dotted for sections "
         "(--set train.lr=1e-3 --set model.overrides.dropout=0.1); the value is read as YAML; "
         "applied last (after --config and the options above).")
NoProgressOpt = typer.Option(
    False, "--no-progress",
    help="No progress bars: plain progress lines, as printed where stderr is not a terminal.")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"uplvp {metadata.version('uplvp')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """UPLVP pipeline: propose -> pretrain -> finetune -> evaluate."""



DeviceOpt = typer.Option(None, "--device", help="auto (default) | cpu | cuda.")
ResumeOpt = typer.Option(None, "--resume", help="Continue from OUT/checkpoints/latest.")
OnNanOpt = typer.Option(
    None, "--on-nan", help="Non-finite loss: skip the batch group (default) | stop (exit 2).")
CheckpointEveryOpt = typer.Option(None, "--checkpoint-every", help="Save a checkpoint every N steps.")
AllowPartialInitOpt = typer.Option(
    None, "--allow-partial-init",
    help="Load only the tensors that fit from the backbone checkpoint (and finetune's --init); "
         "default: a checkpoint of another depth or width is an error.")
NormOpt = typer.Option(
    None, "--norm", help="Backbone BatchNorm: auto (default: frozen with a backbone checkpoint, "
                         "else bn) | frozen | bn | syncbn (DDP on CUDA).")
BackboneLrOpt = typer.Option(
    None, "--backbone-lr-mult", help="Backbone learning rate / --lr (default 1; Mask2Former: 0.1).")
# options that pretrain and finetune share (their defaults live in the stage configs)
RunOutOpt = typer.Option(None, "--out", help="Run folder (checkpoints/, metrics).")
PresetOpt = typer.Option(None, "--preset", help="Model preset: tiny | small (default) | lite | base.")
DecoderOpt = typer.Option(None, "--decoder", help="knet (default) | mask2former.")
BatchSizeOpt = typer.Option(None, "--batch-size", help="Global batch size (default 16).")
LrOpt = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-4).")
NumWorkersOpt = typer.Option(None, "--num-workers", help="DataLoader workers (default 2).")
SeedOpt = typer.Option(None, "--seed", help="Seed of data order and augmentation (default 0).")
AmpOpt = typer.Option(None, "--amp", help="Mixed precision on CUDA: off (default) | bf16 | fp16.")
AccumulationOpt = typer.Option(
    None, "--accumulation-steps", help="Batches per optimizer step (default 1).")

