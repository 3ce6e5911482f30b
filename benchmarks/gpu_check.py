"""The real-scale path on one accelerator, timed: one table per run.

    bash benchmarks/gpu_check.sh                      # on a GPU: base preset, batch 8, 800 px
    .venv/bin/python -m benchmarks.gpu_check --preset tiny --short-side 64 --batch 2 \\
        --steps 1 --skip-clip                         # the same code on a CPU, in seconds

Rows (each in a fresh subprocess, so peak memory is per row):

- ``pretrain`` / ``finetune`` per decoder and AMP mode: one optimizer step (AdamW, the stage's
  criterion: ``PretrainCriterion`` on a ``PromptedModel`` with 20 prompts per image, or
  ``SetCriterion``; 12544 sampled points, as the stages' defaults) on a synthetic batch of
  ``--batch`` images at ``--short-side`` x ``--long-side`` pixels with 8 instances each;
  s/step is the median of ``--steps`` steps after 2 warm-up steps;
- ``evaluate``: inference (eval mode, ``inference_mode``) plus COCO-results post-processing of
  the same batch, images/s;
- ``propose``: the ``clip`` proposer with ``--clip-model`` (RANDOM weights: speed only, its
  masks mean nothing) on ``--clip-batch`` images, images/s.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, else the growth of the process's peak
RSS. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import torch

INSTANCES = 8
PROMPTS = 20
GRID = 16
EMBEDDING = 64
POINTS = 12544


@dataclass
class Row:
    task: str
    decoder: str
    amp: str
    s_per_step: float | None
    images_per_s: float
    peak_mib: float
    note: str = ""


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_start(device: str) -> int:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_mib(device: str, start: int) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024


def synthetic_batch(batch: int, height: int, width: int, with_prompts: bool, seed: int = 0
                    ) -> dict:
    """A training-contract batch (``pipeline.batching.collate``) of random images with
    ``INSTANCES`` rectangles each (and their prompt ingredients when ``with_prompts``)."""
    from pipeline.batching import collate
    from pipeline.transforms import Sample

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(batch):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        masks = np.zeros((INSTANCES, height, width), dtype=bool)
        for k in range(INSTANCES):
            h, w = rng.integers(height // 10, height // 3), rng.integers(width // 10, width // 3)
            y, x = rng.integers(0, height - h), rng.integers(0, width - w)
            masks[k, y:y + h, x:x + w] = True
        labels = rng.integers(0, 3, INSTANCES).astype(np.int64)
        grids = embeddings = None
        if with_prompts:
            grids = np.ones((INSTANCES, GRID, GRID), dtype=bool)
            embeddings = rng.standard_normal((INSTANCES, EMBEDDING)).astype(np.float32)
        samples.append(Sample(i + 1, image, masks, labels, (height, width), grids, embeddings))
    return collate(samples)


def _to(batch: dict, device: str) -> dict:
    moved = dict(batch, images=batch["images"].to(device))
    moved["targets"] = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    if "prompts" in batch:
        moved["prompts"] = [{k: v.to(device) for k, v in p.items()} for p in batch["prompts"]]
    return moved


def measure_training(task: str, preset: str, decoder: str, amp: str, batch: int, height: int,
                     width: int, steps: int, device: str) -> Row:
    from uplvp_model.config import model_config
    from uplvp_model.criterion import PretrainCriterion, SetCriterion
    from uplvp_model.model import build_model
    from uplvp_model.pretraining import PromptedModel, pretraining_targets
    from uplvp_model.prompts import PromptEncoder

    torch.manual_seed(0)
    pretrain = task == "pretrain"
    model = build_model(model_config(preset, decoder=decoder, num_classes=1 if pretrain else 3))
    if pretrain:
        encoder = PromptEncoder(model.cfg.hidden_dim, EMBEDDING, GRID)
        net = PromptedModel(model, encoder, prompts_per_image=PROMPTS).to(device).train()
        criterion = PretrainCriterion(num_points=POINTS).to(device)
    else:
        net = model.to(device).train()
        criterion = SetCriterion(num_points=POINTS).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    data = _to(synthetic_batch(batch, height, width, pretrain), device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device, enabled=dtype is torch.float16)

    def step(index: int) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            if pretrain:
                outputs = net(data["images"], data["prompts"])
                targets = pretraining_targets(outputs, [t["masks"] for t in data["targets"]])
                loss = criterion(outputs, targets, kernel_to_prompt=outputs["kernel_to_prompt"],
                                 step=index)["loss"]
            else:
                loss = criterion(net(data["images"]), data["targets"])["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{task} {decoder} amp {amp}: non-finite loss")
        return time.perf_counter() - start

    start = _peak_start(device)
    for i in range(2):
        step(i)
    seconds = statistics.median(step(2 + i) for i in range(steps))
    return Row(task, decoder, amp, seconds, batch / seconds, _peak_mib(device, start))


def measure_evaluation(preset: str, decoder: str, batch: int, height: int, width: int,
                       steps: int, device: str) -> Row:
    from pipeline.evaluation import batch_to_coco_results
    from uplvp_model.config import model_config
    from uplvp_model.model import build_model

    torch.manual_seed(0)
    model = build_model(model_config(preset, decoder=decoder, num_classes=3)).to(device).eval()
    data = synthetic_batch(batch, height, width, False)
    images = data["images"].to(device)

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            batch_to_coco_results(model(images), data, [1, 2, 3])
        _sync(device)
        return time.perf_counter() - start

    start = _peak_start(device)
    run()
    seconds = statistics.median(run() for _ in range(steps))
    return Row("evaluate", decoder, "off", None, batch / seconds, _peak_mib(device, start),
               "inference + COCO results")


def measure_propose(model_name: str, batch: int, steps: int, device: str) -> Row:
    from uplvp_model.proposal.factory import build_proposer

    proposer = build_proposer("clip", model_name=model_name, checkpoint=None, random_weights=True,
                              device=device, vocabulary=["object", "person", "car", "dog"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(batch)]
    start = _peak_start(device)
    proposer.propose(images[:2])

    def run() -> float:
        _sync(device)
        t0 = time.perf_counter()
        proposer.propose(images)
        _sync(device)
        return time.perf_counter() - t0

    seconds = statistics.median(run() for _ in range(steps))
    return Row("propose", model_name, "off", None, batch / seconds, _peak_mib(device, start),
               "random weights: speed only")


def _call(fn, *args):
    """Run ``fn(*args)`` in a fresh spawned process (own peak memory, clean CUDA state); an
    exception becomes a row that says what failed."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except Exception as err:  # a failed row must not hide the others
            first = str(err).strip().splitlines()[0][:120] if str(err).strip() else repr(err)
            return Row(fn.__name__.replace("measure_", ""), "-", "-", None, 0.0, 0.0,
                       f"FAILED: {type(err).__name__}: {first}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--decoders", nargs="+", default=["knet", "mask2former"])
    parser.add_argument("--amp", nargs="+", default=["off", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--short-side", type=int, default=800)
    parser.add_argument("--long-side", type=int, default=1088,
                        help="width of the synthetic images (multiple of 32)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--clip-model", default="ViT-B-16")
    parser.add_argument("--clip-batch", type=int, default=32)
    parser.add_argument("--skip-clip", action="store_true")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else (
        f"cpu, {torch.get_num_threads()} threads")
    h, w = args.short_side, args.long_side
    print(f"# gpu_check: {name}; torch {torch.__version__}; preset {args.preset}, batch "
          f"{args.batch} at {h}x{w}; median of {args.steps} steps after 2 warm-up")
    memory = "peak alloc MiB" if device == "cuda" else "peak RSS +MiB"
    header = (f"{'task':<9} {'decoder':<12} {'amp':<5} {'s/step':>8} {'images/s':>9} "
              f"{memory:>15}  note")
    print(header)
    print("-" * len(header))
    rows = []
    for decoder in args.decoders:
        for task in ("pretrain", "finetune"):
            for amp in args.amp:
                rows.append(_call(measure_training, task, args.preset, decoder, amp,
                                  args.batch, h, w, args.steps, device))
                _print(rows[-1])
        rows.append(_call(measure_evaluation, args.preset, decoder, args.batch, h, w,
                          args.steps, device))
        _print(rows[-1])
    if not args.skip_clip:
        rows.append(_call(measure_propose, args.clip_model, args.clip_batch,
                          max(1, args.steps // 2), device))
        _print(rows[-1])
    failed = [r for r in rows if r.note.startswith("FAILED")]
    print(f"rows: {len(rows)}, failed: {len(failed)}")
    return 1 if failed else 0


def _print(row: Row) -> None:
    step = f"{row.s_per_step:.3f}" if row.s_per_step is not None else "-"
    print(f"{row.task:<9} {row.decoder:<12} {row.amp:<5} {step:>8} {row.images_per_s:>9.1f} "
          f"{row.peak_mib:>15.0f}  {row.note}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
