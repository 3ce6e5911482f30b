"""What loader workers cost: mask bytes across processes, and worker start-up per epoch.

    .venv/bin/python benchmarks/loader_workers.py               # ~1-2 minutes on 2 cores
    .venv/bin/python benchmarks/loader_workers.py --epochs 5 --images 24

Part 1, masks at detectron2 / Mask2Former scale: one image of 800 x 1333 px with ``--masks``
instances whose boxes cover a random 0.5-20 % of the image (COCO objects are mostly small), the
mask filling ~70 % of its box. Prints the bytes of the padded bool tensor a worker used to send
and of its :class:`~pipeline.compact_masks.CompactMasks`, and the milliseconds to build and to
expand each (median of ``--repeats``).

Part 2, epochs: a planted in-memory source of ``--images`` images (480 x 640, 20 masks each),
batch 2, 2 workers: seconds per epoch with workers started every epoch vs persistent workers,
over ``--epochs`` epochs (the first persistent epoch includes the start-up). The same batches
are checked to come out either way. Compare the two columns as a ratio within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from pipeline.batching import BatchLoader
from pipeline.compact_masks import CompactMasks
from pipeline.transforms import Sample


def planted_masks(rng: np.random.Generator, count: int, h: int, w: int) -> np.ndarray:
    masks = np.zeros((count, h, w), dtype=bool)
    for m in masks:
        share = rng.uniform(0.005, 0.2)
        bh = max(1, int(h * np.sqrt(share) * rng.uniform(0.7, 1.3)))
        bw = max(1, min(w, int(share * h * w / bh)))
        bh = min(bh, h)
        y, x = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        m[y : y + bh, x : x + bw] = rng.random((bh, bw)) < 0.7
    return masks


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def part_masks(args) -> None:
    rng = np.random.default_rng(0)
    h, w = 800, 1333
    masks = planted_masks(rng, args.masks, h, w)
    compact = CompactMasks.from_dense(masks)
    assert torch.equal(compact.to_dense(), torch.from_numpy(masks))

    def dense():
        out = torch.zeros((len(masks), h, w), dtype=torch.bool)
        out[:] = torch.from_numpy(masks)

    print(f"masks: {args.masks} instances at {h} x {w} px, boxes 0.5-20 % of the image")
    print(f"  {'form':<10} {'MB sent':>9} {'build ms':>9} {'expand ms':>10}")
    print(f"  {'dense':<10} {compact.dense_nbytes / 1e6:>9.2f} "
          f"{median_ms(dense, args.repeats):>9.1f} {'-':>10}")
    print(f"  {'compact':<10} {compact.nbytes / 1e6:>9.2f} "
          f"{median_ms(lambda: CompactMasks.from_dense(masks), args.repeats):>9.1f} "
          f"{median_ms(compact.to_dense, args.repeats):>10.1f}")
    print(f"  compact / dense bytes: {compact.nbytes / compact.dense_nbytes:.4f}")


class PlantedSource:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(self.n)

    def load(self, index: int, rng: np.random.Generator) -> Sample:
        h, w = 480, 640
        masks = planted_masks(rng, 20, h, w)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        return Sample(index + 1, image, masks, np.zeros(20, dtype=np.int64), (h, w))


def epoch_seconds(loader: BatchLoader, epochs: int) -> tuple[list[float], list[list[int]]]:
    seconds, ids = [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        batches = list(loader.make_batches(epoch))
        seconds.append(time.perf_counter() - t0)
        ids.append([i for b in batches for i in b["image_ids"]])
    return seconds, ids


def part_epochs(args) -> None:
    fresh = BatchLoader(PlantedSource(args.images), 2, seed=0, num_workers=2)
    kept = BatchLoader(PlantedSource(args.images), 2, seed=0, num_workers=2,
                       persistent_workers=True)
    fresh_s, fresh_ids = epoch_seconds(fresh, args.epochs)
    kept_s, kept_ids = epoch_seconds(kept, args.epochs)
    assert fresh_ids == kept_ids
    print(f"epochs: {args.images} images of 480 x 640 px, 20 masks each, batch 2, 2 workers, "
          f"threads {torch.get_num_threads()}")
    print(f"  {'epoch':>5} {'fresh workers s':>16} {'persistent s':>13}")
    for e, (a, b) in enumerate(zip(fresh_s, kept_s)):
        print(f"  {e:>5} {a:>16.2f} {b:>13.2f}")
    print(f"  total fresh / persistent: {sum(fresh_s) / sum(kept_s):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--masks", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    part_masks(args)
    part_epochs(args)


if __name__ == "__main__":
    main()
