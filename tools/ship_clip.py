"""Make a CLIP trained by ``tools/train_clip.py`` a model the package ships, by name.

    .venv/bin/python -m tools.ship_clip --run runs/clip_synth_long --name uplvp-synth-vit

writes ``uplvp_model/proposal/shipped_models/<name>/`` (the format of
``uplvp_model.proposal.shipped``, documented in docs/proposers.md): the open_clip config,
the weights in half precision as ``open_clip_model.safetensors``, and ``card.yaml`` with the
description, vocabulary, sha256, the training command rebuilt from the run's recorded settings,
its data seeds, the held-out metrics the run printed and the proposer options the study and the
demo read it with. Refuses a run whose training did not finish (no ``metrics.json``).
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from uplvp_model.proposal import shipped

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = (
    "A toy CLIP for the synthetic scenes of pipeline.synth (8 shape categories), trained on this "
    "project's CPUs by tools/train_clip.py: open_clip's ViT and text tower and its "
    "contrastive loss on generated scenes and captions, plus a dense term on the object masks of "
    "its own training scenes (split 'clip-train', never the demo's or the study's images). It is "
    "not a general CLIP: it knows 8 shapes, colours and sizes on synthetic backgrounds. For real "
    "images pass real CLIP weights (--clip-model NAME --clip-checkpoint FILE).")
# how the study (phase 13) and the demo read this model with the clip proposer: the model's input
# is 96 px (12x12 patches); at 128 px the proposer reads a 16x16 grid
PROPOSER_OPTIONS = {"input_size": 128, "temperature": 25.0, "threshold": 0.5, "min_peak": 0.8}
# the settings train_clip.py records that do not change the weights
NOT_COMMAND = {"out", "threads", "workers", "log_every", "eval_every", "checkpoint_every",
               "resume", "stop_after", "eval_images"}


def training_command(settings: dict, defaults: dict) -> str:
    """The train_clip.py command line that reproduces these weights (non-default settings)."""
    parts = [".venv/bin/python", "-m", "tools.train_clip"]
    for key, value in settings.items():
        if key in NOT_COMMAND or defaults.get(key) == value:
            continue
        parts += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def held_out(metrics: dict) -> dict:
    trained = metrics["trained"]
    return {"images": trained["images"], "zero_shot_map": round(trained["mAP"], 4),
            "zero_shot_map_chance": round(trained["mAP_chance"], 4),
            "dense_patch_accuracy": round(trained["patch_acc_objects"], 4),
            "dense_patch_accuracy_chance": round(trained["patch_acc_objects_chance"], 4)}


def ship(run: Path, name: str, dest: Path) -> Path:
    from tools.train_clip import HELDOUT_SPLIT, TRAIN_SPLIT, parse_args

    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise SystemExit(f"error: {metrics_path} not found: the run has not finished training")
    metrics = json.loads(metrics_path.read_text())
    settings = metrics["settings"]
    config_path = run / f"{Path(settings['config']).stem}.json"
    weights_path = run / f"{Path(settings['config']).stem}.pt"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise SystemExit(f"error: {path} not found")
    defaults = {k: str(v) if isinstance(v, Path) else v for k, v in vars(parse_args([])).items()}
    folder = dest / name
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = json.loads(config_path.read_text())
    (folder / shipped.CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg}, indent=1) + "\n")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(half, str(folder / shipped.WEIGHTS_FILE))
    vocabulary = [line.strip() for line in (run / "vocabulary.txt").read_text().splitlines()
                  if line.strip() and not line.startswith("#")]
    card = {
        "format_version": shipped.CARD_VERSION,
        "description": DESCRIPTION,
        "weights": shipped.WEIGHTS_FILE,
        "sha256": shipped.file_sha256(folder / shipped.WEIGHTS_FILE),
        "precision": "fp16",
        "vocabulary": vocabulary,
        "command": training_command(settings, defaults),
        "data_seeds": {"seed": settings["seed"], "train_split": TRAIN_SPLIT,
                       "train_images": settings["train_images"], "heldout_split": HELDOUT_SPLIT,
                       "heldout_images": settings["eval_images"]},
        "held_out": held_out(metrics),
        "training_seconds": metrics["seconds"],
        "proposer_options": PROPOSER_OPTIONS,
    }
    (folder / shipped.CARD_FILE).write_text(yaml.safe_dump(card, sort_keys=False, width=100))
    size = (folder / shipped.WEIGHTS_FILE).stat().st_size / 2**20
    print(f"shipped {name}: {folder} ({size:.1f} MB fp16, sha256 {card['sha256'][:12]}...); "
          f"held-out {card['held_out']}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished train_clip.py --out")
    parser.add_argument("--name", default="uplvp-synth-vit")
    parser.add_argument("--dest", type=Path, default=shipped.SHIPPED_DIR)
    args = parser.parse_args()
    ship(args.run, args.name, args.dest)


if __name__ == "__main__":
    main()
