"""Training-data throughput: images/s that ``make_batches`` delivers from proposal shards,
against what the model consumes, and the share of step time the trainer waits for data.

Writes synthetic shards (random images, ellipse pseudo masks, random embeddings) into a
temporary folder, then times full epochs of the pre-training loader for each worker count:

    .venv/bin/python -m benchmarks.train_throughput                  # 200 images at 128 px
    .venv/bin/python -m benchmarks.train_throughput --images 400 --size 256 --workers 0 2 4

The time covers shard reading, RLE decoding, image decoding, augmentation (scale jitter around
``--size``, flip) and collation into the batch dict; it starts before the first batch is asked
for, so worker start-up is included. The fastest of ``--repeats`` epochs is reported (the
least disturbed by other load).

Then it runs the real pre-training stage (``stages.pretrain.run_pretrain``) on the same shards
for ``--steps`` steps per ``--presets`` model and reads its ``metrics.jsonl``: model consumption
= batch size / (step time without data wait), and the trainer's measured data-wait share of
step time. Goals: data wait < 5 % of step time; decode throughput >= 10x model consumption.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from pipeline.shard_dataset import pretrain_loader
from pipeline.shards import plan_shards, write_shard
from pipeline.transforms import AugmentConfig
from uplvp_model.proposal.ingredients import mask_box_xywh, pack_bits, shape_grid


def write_synthetic_shards(
    out_dir: Path,
    *,
    num_images: int = 200,
    size: int = 128,
    masks_per_image: int = 10,
    shard_size: int = 64,
    embedding_dim: int = 512,
    grid_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write ``num_images`` random ``size x size`` PNGs and their proposal shards under
    ``out_dir``; every image gets ``masks_per_image`` filled ellipses (score 0.6..1) that pass
    the default mask filter. Returns the shard folder."""
    rng = np.random.default_rng(seed)
    image_dir, shard_dir = out_dir / "images", out_dir / "proposals"
    image_dir.mkdir(parents=True, exist_ok=True)
    for shard in plan_shards(num_images, shard_size):
        mask_rows, image_rows = [], []
        for image_id in range(shard.start + 1, shard.stop + 1):
            path = image_dir / f"{image_id:06d}.png"
            cv2.imwrite(str(path), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for k in range(masks_per_image):
                mask = _ellipse(rng, size)
                rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
                embedding = rng.standard_normal(embedding_dim).astype(np.float32)
                mask_rows.append({
                    "image_id": image_id, "image_path": str(path), "height": size,
                    "width": size, "mask_index": k, "rle_counts": rle["counts"],
                    "bbox": list(mask_box_xywh(mask)), "area": int(mask.sum()),
                    "score": float(1.0 - 0.04 * k), "label": "object", "label_index": 0,
                    "clip_embedding": (embedding / np.linalg.norm(embedding)).astype(np.float16),
                    "shape_grid": pack_bits(shape_grid(mask, grid_size)),
                })
            image_rows.append({"image_id": image_id, "image_path": str(path), "height": size,
                               "width": size, "status": "ok", "error": "",
                               "num_masks": masks_per_image})
        write_shard(shard_dir, shard.index, mask_rows, image_rows, "benchmark")
    return shard_dir


def _ellipse(rng: np.random.Generator, size: int) -> np.ndarray:
    """A filled ellipse of at least 8 px radius inside a ``size x size`` bool mask."""
    mask = np.zeros((size, size), dtype=np.uint8)
    centre = tuple(int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
    axes = tuple(int(v) for v in rng.integers(8, max(9, size // 4), 2))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


@dataclass
class Throughput:
    label: str
    images: int
    best_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.best_s


def measure_loader(
    label: str, make_batches: Callable[[int], Iterator[dict]], repeats: int = 3
) -> Throughput:
    """Time ``repeats`` full passes of ``make_batches(epoch)`` (epochs 0, 1, ...); the fastest
    pass and its image count."""
    best, images = float("inf"), 0
    for epoch in range(repeats):
        start = time.perf_counter()
        images = sum(len(batch["image_ids"]) for batch in make_batches(epoch))
        best = min(best, time.perf_counter() - start)
    return Throughput(label, images, best)


def decode_throughput(
    shard_dir: Path, *, size: int, batch_size: int, num_workers: int, repeats: int
) -> Throughput:
    """Images/s of the pre-training loader on ``shard_dir`` (jitter 0.8..1.2 x ``size``, flip)."""
    augment = AugmentConfig((int(0.8 * size), int(1.2 * size)), 2 * size, 0.5)
    loader = pretrain_loader(shard_dir, batch_size, seed=0, augment_config=augment,
                             num_workers=num_workers, rank=0, world_size=1)
    return measure_loader(f"shards, {num_workers} workers", loader.make_batches, repeats)


def model_consumption(shard_dir: Path, out_dir: Path, *, preset: str, size: int,
                      batch_size: int, num_workers: int, steps: int) -> dict:
    """Train ``steps`` pre-training steps and return the median step time, the data-wait share
    and the images/s the model consumes (excluding data wait), from the run's metrics."""
    import json

    from stages.pretrain import PretrainConfig, run_pretrain
    from pipeline.engine import TrainConfig
    from stages.training_setup import DataSection, ModelSection

    cfg = PretrainConfig(
        shards=shard_dir, out=out_dir, model=ModelSection(preset=preset),
        data=DataSection(batch_size=batch_size, short_side=(int(0.8 * size), int(1.2 * size)),
                         max_long_side=2 * size, num_workers=num_workers),
        train=TrainConfig(max_steps=steps, warmup_steps=1, log_every=1, checkpoint_every=steps,
                          progress=False, tensorboard=False),
        device="cpu",
    )
    run_pretrain(cfg, progress=False)
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r.get("kind") == "train"][2:]  # drop warm-up steps
    step_s = float(np.median([r["step_seconds"] for r in train]))
    wait = float(np.median([r["data_wait_share"] for r in train]))
    return {"step_s": step_s, "data_wait_share": wait,
            "images_per_s": batch_size / (step_s * (1 - wait))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=128, help="square image side in pixels")
    parser.add_argument("--masks", type=int, default=10, help="pseudo masks per image")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="*", default=["tiny", "small"],
                        help="model presets whose consumption is measured (none: skip)")
    parser.add_argument("--steps", type=int, default=12, help="pre-training steps per preset")
    parser.add_argument("--train-workers", type=int, default=2, help="loader workers in training")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="uplvp-throughput-") as tmp:
        start = time.perf_counter()
        shard_dir = write_synthetic_shards(Path(tmp), num_images=args.images, size=args.size,
                                           masks_per_image=args.masks)
        print(f"wrote {args.images} images ({args.size} px, {args.masks} masks each) in "
              f"{time.perf_counter() - start:.1f} s; batch {args.batch_size}, best of "
              f"{args.repeats} epochs")
        print(f"{'loader':<22} {'images':>7} {'seconds':>8} {'images/s':>9}")
        for workers in args.workers:
            r = decode_throughput(shard_dir, size=args.size, batch_size=args.batch_size,
                                  num_workers=workers, repeats=args.repeats)
            print(f"{r.label:<22} {r.images:>7} {r.best_s:>8.2f} {r.images_per_s:>9.1f}",
                  flush=True)
            decode = r.images_per_s
        if args.presets:
            print(f"\n{'model':<8} {'step s':>7} {'data wait':>10} {'model img/s':>12} "
                  f"{'decode/model':>13}  (pre-training, batch {args.batch_size}, "
                  f"{args.train_workers} loader workers)")
        for preset in args.presets:
            m = model_consumption(shard_dir, Path(tmp) / f"run-{preset}", preset=preset,
                                  size=args.size, batch_size=args.batch_size,
                                  num_workers=args.train_workers, steps=args.steps)
            print(f"{preset:<8} {m['step_s']:>7.3f} {100 * m['data_wait_share']:>9.1f}% "
                  f"{m['images_per_s']:>12.1f} {decode / m['images_per_s']:>12.1f}x", flush=True)


if __name__ == "__main__":
    main()
