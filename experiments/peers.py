"""Our decoders against what a user would pick instead, at one training budget.

    .venv/bin/pip install -e '.[bench]'                        # transformers (the peer)
    .venv/bin/python -m experiments.peers --out runs/peers --sizes 128 256 --steps 250 500
    .venv/bin/python -m experiments.peers --out runs/peers_own --train T.yaml --val V.yaml \
        --sizes 256 --steps 500                                  # your own COCO manifests

Models (``--models``), all from random initialisation (or ``--backbone-checkpoint``, the same
local torchvision ResNet weights for every model that can take them):

- ``knet`` / ``mask2former``: ours, trained by ``uplvp stage finetune`` (``run_finetune``) and
  scored by ``uplvp stage evaluate``'s code, ``--preset`` with ``--overrides`` (ModelConfig)
  and ``--loss`` (the fine-tuning loss options, e.g. ``{"importance_sample_ratio": 0.75}``);
- ``hf_mask2former``: transformers' ``Mask2FormerForUniversalSegmentation`` built from its
  default ``Mask2FormerConfig`` (6 deformable encoder layers, 10 decoder layers, 100 queries,
  hidden 256, its own Hungarian matcher and losses) on a transformers ResNet of the same depth;
  nothing is downloaded;
- ``maskrcnn``: torchvision's ``MaskRCNN`` on ``resnet_fpn_backbone(<depth>, weights=None)``
  with trained BatchNorm (what ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)``
  uses), i.e. the ``maskrcnn_resnet50_fpn`` family at our backbone depth.

The budget is the same for every model: the same batches (our loader: same images, order,
scale jitter and flips for one seed), optimizer steps, batch size, AdamW learning rate, weight
decay, warmup + cosine schedule, gradient clipping (``pipeline.engine.train`` runs every model),
torch threads. The peers get our loader's normalised, padded images; Mask R-CNN's own resize
is switched off (the loader already resized) and its normalisation is the identity. Every model
is scored by the same code: ``pipeline.evaluation.evaluate_predictions`` (pycocotools segm) on
the val manifest at ``--size``; the query models' outputs go through our Mask2Former-style
post-processing (``pipeline.evaluation.postprocess``), Mask R-CNN's through its own (box score, pasted mask
probabilities > 0.5).

Each (size, steps, model) cell runs in its own process (``--threads`` torch threads) and writes
``OUT/cells/<cell>/result.json``; a rerun skips finished cells, so the benchmark resumes. The
table (mask AP, AP50, AP75, s/step over the training loop, peak memory: resident set of the
cell's process on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), under a line naming the
settings its cells share and one naming the machines they ran on (CPU model or GPU, torch
version: the same cell on another CPU gives other numbers), is printed and written to
``OUT/peers.txt``. Without ``--train``, a
synthetic benchmark per size is generated with ``pipeline.synth`` at ``--data-seed`` (80 train /
40 val images) under ``--data-dir``.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from experiments.peer_models import (  # noqa: E402,F401  (the adapters, re-exported for tests and users)
    RESNET_LAYOUT,
    QueryOutputs,
    build_hf_mask2former,
    build_maskrcnn,
    hf_mask2former_loss,
    maskrcnn_inputs,
    maskrcnn_loss,
    maskrcnn_results,
    score_peer,
    train_peer,
    valid_pixel_mask,
)

MODELS = ("knet", "mask2former", "hf_mask2former", "maskrcnn")
OURS = ("knet", "mask2former")
GENERATED_TRAIN, GENERATED_VAL = 80, 40  # images of a generated benchmark
# FinetuneConfig fields that --loss may set
LOSS_OPTIONS = ("ce_weight", "bce_weight", "dice_weight", "no_object_weight", "num_points",
                "importance_sample_ratio", "oversample_ratio", "stage_assignment")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (resumable)")
    p.add_argument("--train", type=Path, help="labeled train manifest (default: generated)")
    p.add_argument("--val", type=Path, help="labeled val manifest (with --train)")
    p.add_argument("--sizes", type=int, nargs="+", default=[128],
                   help="image sizes: the long side of training (scale jitter 0.8x-1x of it) "
                        "and of evaluation")
    p.add_argument("--steps", type=int, nargs="+", default=[250], help="training budgets")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup (default: a tenth of the budget, at most 100)")
    p.add_argument("--depth", default="resnet18", choices=sorted(RESNET_LAYOUT),
                   help="backbone depth of every model")
    p.add_argument("--backbone-checkpoint", type=Path,
                   help="local torchvision ResNet weights for ours and Mask R-CNN (the "
                        "transformers peer then stays random: its ResNet has other names)")
    p.add_argument("--preset", default="small", help="our model preset")
    p.add_argument("--overrides", type=json.loads, default={"hidden_dim": 256},
                   help="our ModelConfig overrides as JSON (default: hidden 256 as the peer)")
    p.add_argument("--loss", type=json.loads, default={},
                   help="our fine-tuning loss options as JSON: any of " + ", ".join(LOSS_OPTIONS))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=7)
    p.add_argument("--data-dir", type=Path,
                   help="where generated benchmarks live (default OUT/data; share one between "
                        "--out folders that compare settings)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cell", type=json.loads, help=argparse.SUPPRESS)  # one cell (child process)
    args = p.parse_args(argv)
    unknown = sorted(set(args.loss) - set(LOSS_OPTIONS))
    if unknown:
        p.error(f"--loss: unknown option(s) {', '.join(unknown)}; choose from {', '.join(LOSS_OPTIONS)}")
    return args


# --------------------------------------------------------------------------------------------
# one cell


def train_config(spec: dict):
    from pipeline.engine import TrainConfig

    steps = spec["steps"]
    warmup = spec["warmup_steps"]
    if warmup is None:
        warmup = min(100, steps // 10)
    return TrainConfig(max_steps=steps, lr=spec["lr"], warmup_steps=warmup,
                       checkpoint_every=steps, log_every=max(1, steps // 10), seed=spec["seed"],
                       progress=False, tensorboard=False)


def augment_sizes(size: int) -> tuple[tuple[int, int], int]:
    """(short-side jitter range, max long side) for square-ish images of long side ``size``."""
    return (int(round(0.8 * size)), size), size


def run_cell(spec: dict) -> dict:
    """Train and score one model; returns the result row."""
    from pipeline.coco_dataset import category_ids as sorted_category_ids
    from pipeline.manifest import load_manifest
    from pipeline.transforms import AugmentConfig, eval_config
    from pipeline.evaluation import load_inference_model
    from stages.finetune import FinetuneConfig, run_finetune
    from pipeline.engine.distributed import resolve_device
    from stages.training_setup import DataSection, ModelSection

    torch.set_num_threads(spec["threads"])
    run_dir = Path(spec["run_dir"])
    device = torch.device(resolve_device(spec["device"]))
    train_set, val_set = load_manifest(Path(spec["train"])), load_manifest(Path(spec["val"]))
    category_ids = sorted_category_ids(train_set.categories)
    jitter, long_side = augment_sizes(spec["size"])
    train_cfg = train_config(spec)
    model_name = spec["model"]
    started = time.perf_counter()
    if model_name in OURS:
        overrides = dict(spec["overrides"])
        run_finetune(FinetuneConfig(
            train_data=Path(spec["train"]), out=run_dir, init="none",
            model=ModelSection(preset=spec["preset"], decoder=model_name,
                               backbone_checkpoint=spec["backbone_checkpoint"],
                               overrides={"backbone": spec["depth"], **overrides}),
            data=DataSection(batch_size=spec["batch_size"], short_side=jitter,
                             max_long_side=long_side, eval_short_side=spec["size"],
                             num_workers=0, seed=spec["seed"]),
            train=train_cfg, device=str(device), **spec.get("loss", {})), progress=False)
        model = load_inference_model(run_dir, str(device)).model
    else:
        ckpt = spec["backbone_checkpoint"]
        model = train_peer(model_name, train_set, category_ids, batch_size=spec["batch_size"],
                           augment=AugmentConfig(jitter, long_side, 0.5), seed=spec["seed"],
                           train_cfg=train_cfg, run_dir=run_dir, device=device,
                           depth=spec["depth"], size=spec["size"], backbone_checkpoint=ckpt)
    trained = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    metrics = score_peer(model_name, model, val_set, category_ids,
                         eval_config(spec["size"], long_side), device)
    if device.type != "cuda":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    segm = metrics["segm"]
    return {
        "model": model_name, "size": spec["size"], "steps": spec["steps"],
        "AP": segm["AP"], "AP50": segm["AP50"], "AP75": segm["AP75"],
        "s_per_step": loop_seconds_per_step(run_dir / "metrics.jsonl"),
        "train_wall_s": trained, "peak_mb": peak,
        "memory": "cuda allocated" if device.type == "cuda" else "process RSS",
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device), "spec": {k: v for k, v in spec.items() if k != "run_dir"},
    }


def loop_seconds_per_step(metrics_file: Path) -> float:
    """Mean seconds per optimizer step of the training loop (data wait included; start-up,
    checkpoint writes and evaluation excluded), from the trainer's metrics lines."""
    from pipeline.engine.metrics import read_metrics

    seconds, steps, last = 0.0, 0, 0
    for record in read_metrics(metrics_file):
        if record.get("kind") == "train":
            window = record["step"] - last
            seconds += record["step_seconds"] * window
            steps += window
            last = record["step"]
    return seconds / max(steps, 1)


# --------------------------------------------------------------------------------------------
# the driver


def datasets(args: argparse.Namespace) -> dict[int, tuple[Path, Path]]:
    """(train, val) manifest per size: the given pair, or a generated benchmark per size."""
    if args.train is not None:
        if args.val is None:
            raise SystemExit("error: --train needs --val")
        return {size: (args.train, args.val) for size in args.sizes}
    from pipeline.synth import write_synth_dataset

    pairs = {}
    for size in args.sizes:
        folder = (args.data_dir or args.out / "data") / f"{size}px"
        if not (folder / "data.done").is_file():
            write_synth_dataset(folder, seed=args.data_seed, num_unlabeled=0,
                                num_train=GENERATED_TRAIN, num_val=GENERATED_VAL,
                                image_size=size, progress=False)
            (folder / "data.done").write_text("complete\n")
        pairs[size] = (folder / "train.yaml", folder / "val.yaml")
    return pairs


def table(rows: list[dict]) -> str:
    lines = ["| size | steps | model | mask AP | AP50 | AP75 | s/step | peak MB | params (M) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["size"], r["steps"], MODELS.index(r["model"]))):
        lines.append(
            f"| {r['size']} | {r['steps']} | {r['model']} | {100 * r['AP']:.1f} | "
            f"{100 * r['AP50']:.1f} | {100 * r['AP75']:.1f} | {r['s_per_step']:.3f} | "
            f"{r['peak_mb']:.0f} | {r['parameters'] / 1e6:.1f} |")
    return "\n".join(lines)


def settings_line(args: argparse.Namespace) -> str:
    """What every cell of the table shares, written above it (a table names no settings)."""
    data = (f"manifests {args.train} / {args.val}" if args.train is not None
            else f"generated by pipeline.synth, data seed {args.data_seed}, "
                 f"{GENERATED_TRAIN} train / {GENERATED_VAL} val")
    return (f"# peers.py: batch {args.batch_size}, lr {args.lr:g}, warmup "
            f"{'default' if args.warmup_steps is None else args.warmup_steps}, {args.depth} "
            f"{'from ' + str(args.backbone_checkpoint) if args.backbone_checkpoint else 'random init'}"
            f", {args.threads} thread(s), seed {args.seed}, device {args.device}; ours: preset "
            f"{args.preset}, overrides {json.dumps(args.overrides)}, loss {json.dumps(args.loss)}"
            f"; data: {data}")


def machine_name(device: str) -> str:
    """The processor a cell ran on (CPU model, or GPU name on CUDA) and the torch version: the
    same cell on another CPU gives other numbers (float order), so a table says where it ran."""
    from pipeline.engine.distributed import resolve_device

    if resolve_device(device).startswith("cuda"):
        chip = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = ([line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                   if line.startswith("model name")] if cpuinfo.is_file() else [])
        chip = models[0] if models else (platform.processor() or platform.machine())
    return f"{chip}, torch {torch.__version__}"


def machines_line(rows: list[dict]) -> str:
    """Where the table's cells ran, with how many cells each (a resumed table can mix machines;
    cells from before the field existed count as "not recorded")."""
    counts = collections.Counter(r.get("machine", "not recorded") for r in rows)
    return "# ran on: " + "; ".join(f"{name} ({n} cell{'s' if n > 1 else ''})"
                                    for name, n in counts.most_common())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cell is not None:
        result = {**run_cell(args.cell), "machine": machine_name(args.cell["device"])}
        Path(args.cell["run_dir"], "result.json").write_text(json.dumps(result, indent=1))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size, (train_manifest, val_manifest) in datasets(args).items():
        for steps in args.steps:
            for model in args.models:
                name = f"{size}px-{steps}steps-{model}"
                run_dir = args.out / "cells" / name
                result_file = run_dir / "result.json"
                if not result_file.is_file():
                    spec = {"model": model, "size": size, "steps": steps,
                            "train": str(train_manifest), "val": str(val_manifest),
                            "batch_size": args.batch_size, "lr": args.lr,
                            "warmup_steps": args.warmup_steps, "depth": args.depth,
                            "backbone_checkpoint": (str(args.backbone_checkpoint)
                                                    if args.backbone_checkpoint else None),
                            "preset": args.preset, "overrides": args.overrides,
                            "loss": args.loss, "threads": args.threads, "seed": args.seed, "device": args.device,
                            "run_dir": str(run_dir)}
                    if run_dir.exists():  # an interrupted cell restarts from nothing
                        shutil.rmtree(run_dir)
                    run_dir.mkdir(parents=True)
                    print(f"peers: {name} ...", flush=True)
                    t0 = time.perf_counter()
                    code = subprocess.call([sys.executable, "-m", "experiments.peers", "--out",
                                            str(args.out), "--cell", json.dumps(spec)],
                                           stdout=open(run_dir / "log.txt", "w"),
                                           stderr=subprocess.STDOUT, cwd=REPO)
                    if code:
                        print(f"peers: {name} failed (exit {code}); see {run_dir / 'log.txt'}",
                              flush=True)
                        continue
                    print(f"peers: {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
                rows.append(json.loads(result_file.read_text()))
    text = settings_line(args) + "\n" + machines_line(rows) + "\n" + table(rows)
    print(text)
    (args.out / "peers.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
