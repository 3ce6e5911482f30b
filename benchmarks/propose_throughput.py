"""Propose-stage throughput: images/s of a single-process loop vs. the Ray stage's actors.

Writes synthetic unlabeled images (``pipeline.synth``, seed 0) into a temporary folder, then per
proposer times the stage's per-shard worker (``stages.propose_worker.ProposeShardWorker``:
read image -> propose -> rows -> Parquet shard) over the same shards in two ways:

  loop  the worker built once in this process and called over the shards (what the stage does
        with ``num_workers=0``), after one warm-up shard;
  ray   ``pipeline.executor.run_shards`` with ``--workers`` Ray Data actors (what the stage does
        with ``num_workers=2``), after a warm-up run over the first shards.

    .venv/bin/python -m benchmarks.propose_throughput                 # classical + ViT-B-16
    .venv/bin/python -m benchmarks.propose_throughput --skip-clip --images 192

``clip`` runs ViT-B-16 with RANDOM weights (no checkpoint): its compute cost is real, its masks
are meaningless and are not looked at. Its text embeddings are cached in a temporary file by the
first build so that later builds (the Ray actors) do not recompute them.

Timing: ``setup s`` is excluded from images/s and reported apart: for the loop, building the
worker (proposer, model); for Ray, from the start of the run until the first actor starts its
first shard (Ray Data builds a fresh actor pool on every run: process start, imports, proposer
build). ``seconds`` runs from there to the last summary. The loop's ViT-B-16 setup also computes
the text embeddings (~650 prompts); the actors read them from the cache file (the stage itself
sets no ``text_cache_file``, so its actors recompute them on every run). Ray's own start
(``ray.init``) is timed once and printed apart. Shares are of the workers' time
(``seconds x workers``): ``propose %`` is time inside ``proposer.propose`` (the worker's
``model_seconds``: letterbox, model forward and the proposer's own mask extraction), ``rows %``
the rest of the shard work (image decoding, RLE / shape grid / row building, Parquet write),
``idle %`` what is left (scheduling, waiting, uneven shards). For ViT-B-16 the forward alone is
also timed in this process (``dense_clip_features`` on the letterboxed batches).

The numbers depend on the machine and on other load: take them on a quiet machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import ray
import torch

from pipeline.executor import ExecutorConfig, cpus_per_worker, ensure_ray, run_shards
from pipeline.images import read_image_rgb
from pipeline.manifest import load_manifest
from pipeline.shards import plan_shards
from pipeline.synth import write_synth_dataset
from stages.propose import ProposeConfig
from stages.propose import worker_kwargs as stage_worker_kwargs
from stages.propose_worker import ProposeShardWorker
from uplvp_model.proposal.base import letterbox_batch
from uplvp_model.proposal.clip_dense import dense_clip_features


class TimedShardWorker:
    """``ProposeShardWorker`` whose summaries also carry ``started_at`` (when the shard began),
    ``built_at`` (when the worker was ready) and ``pid``; times are ``time.time()`` seconds,
    comparable between the processes of one machine."""

    def __init__(self, **kwargs: Any) -> None:
        self.worker = ProposeShardWorker(**kwargs)
        self.built_at = time.time()
        self.pid = os.getpid()

    def __call__(self, shard_index: int) -> dict:
        started_at = time.time()
        summary = self.worker(shard_index)
        return {**summary, "started_at": started_at, "built_at": self.built_at, "pid": self.pid}


@dataclass
class Measurement:
    """One timed run over ``images`` images; ``model_s`` / ``shard_s`` are sums over shards of
    the worker's ``model_seconds`` / ``seconds``."""

    proposer: str
    mode: str
    workers: int
    images: int
    setup_s: float
    seconds: float
    model_s: float
    shard_s: float
    processes: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    def share(self, part: str) -> float:
        """Share of worker time (``seconds x workers``) in ``propose``, ``rows`` or ``idle``."""
        total = self.seconds * self.workers
        values = {"propose": self.model_s, "rows": self.shard_s - self.model_s}
        values["idle"] = total - values["propose"] - values["rows"]
        return values[part] / total


def worker_kwargs(cfg: ProposeConfig, images: list[tuple[int, str]], out_dir: Path) -> dict:
    """Constructor arguments of the stage's worker for ``cfg`` writing into ``out_dir``."""
    return stage_worker_kwargs(cfg.model_copy(update={"out": out_dir}), images, cfg.config_hash())


def _check(summaries: list[dict]) -> list[dict]:
    failed = [s for s in summaries if s["status"] != "ok"]
    if failed:
        raise SystemExit(f"shard {failed[0]['shard']} failed: {failed[0]['error']}")
    return summaries


def measure_loop(
    label: str, kwargs: dict, shards: list[int]
) -> tuple[Measurement, ProposeShardWorker]:
    """Build the worker in this process, run one warm-up shard, then time all ``shards``;
    returns the measurement and the worker."""
    start = time.perf_counter()
    worker = ProposeShardWorker(**kwargs)
    setup = time.perf_counter() - start
    _check([worker(shards[0])])
    start = time.perf_counter()
    summaries = _check([worker(i) for i in shards])
    seconds = time.perf_counter() - start
    return _measurement(label, "loop", 1, summaries, setup, seconds), worker


def measure_ray(
    label: str, kwargs: dict, warmup_kwargs: dict, shards: list[int], workers: int
) -> Measurement:
    """A warm-up run over the first ``workers`` shards (into another folder), then time a run
    over all ``shards`` on ``workers`` Ray Data actors."""
    if TimedShardWorker.__module__ != "__main__":  # imported: ship this module to the actors
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[TimedShardWorker.__module__])
    executor = ExecutorConfig(num_workers=workers)
    _check(list(run_shards(shards[:workers], TimedShardWorker, warmup_kwargs, executor)))
    start = time.time()
    summaries = _check(list(run_shards(shards, TimedShardWorker, kwargs, executor)))
    end = time.time()
    first = min(s["started_at"] for s in summaries)
    return _measurement(label, "ray", workers, summaries, first - start, end - first)


def _measurement(label, mode, workers, summaries, setup, seconds) -> Measurement:
    return Measurement(
        proposer=label,
        mode=mode,
        workers=workers,
        images=sum(s["images"] for s in summaries),
        setup_s=setup,
        seconds=seconds,
        model_s=sum(s["model_seconds"] for s in summaries),
        shard_s=sum(s["seconds"] for s in summaries),
        processes=len({s.get("pid", os.getpid()) for s in summaries}),
    )


@torch.inference_mode()
def vit_forward_seconds(proposer, paths: list[str], input_size: int, batch_size: int,
                        max_side: int) -> float:
    """Seconds per image of ``dense_clip_features`` alone (letterboxing excluded) on the images
    at ``paths``, in batches of ``batch_size``, after one warm-up batch."""
    clip = proposer.clip
    batches = []
    for b in range(0, len(paths), batch_size):
        images = [read_image_rgb(p, max_side) for p in paths[b : b + batch_size]]
        canvas, _ = letterbox_batch(images, input_size, clip.mean, clip.std)
        batches.append(torch.from_numpy(canvas))
    dense_clip_features(clip.model, batches[0])
    start = time.perf_counter()
    for batch in batches:
        dense_clip_features(clip.model, batch)
    return (time.perf_counter() - start) / len(paths)


def print_table(results: list[Measurement]) -> None:
    rate = {(r.proposer, r.mode): r.images_per_s for r in results}
    headers = ["proposer", "mode", "workers", "images", "setup s", "seconds", "images/s",
               "ray/loop", "ray/loop-1t", "propose %", "rows %", "idle %"]
    rows = []
    for r in results:
        ratios = ["", ""]
        if r.mode == "ray":
            ratios = [f"{r.images_per_s / rate[(r.proposer, m)]:.2f}x" for m in ("loop", "loop-1t")]
        rows.append([r.proposer, r.mode, str(r.workers), str(r.images), f"{r.setup_s:.1f}",
                     f"{r.seconds:.2f}", f"{r.images_per_s:.1f}", *ratios,
                     f"{100 * r.share('propose'):.0f}", f"{100 * r.share('rows'):.0f}",
                     f"{100 * r.share('idle'):.0f}"])
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    print(line(headers))
    print("-" * len(line(headers)))
    for row in rows:
        print(line(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="images for classical")
    parser.add_argument("--clip-images", type=int, default=32, help="images for ViT-B-16")
    parser.add_argument("--image-size", type=int, default=128, help="synthetic base size")
    parser.add_argument("--input-size", type=int, default=224,
                        help="ViT input (letterbox) size, a multiple of 16")
    parser.add_argument("--clip-model", default="ViT-B-16")
    parser.add_argument("--shard-size", type=int, default=8,
                        help="images per shard (small, so every actor gets several shards)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="Ray actors")
    parser.add_argument("--skip-clip", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="uplvp-propose-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        count = max(args.images, 0 if args.skip_clip else args.clip_images)
        start = time.perf_counter()
        write_synth_dataset(tmp / "data", seed=0, num_unlabeled=count, num_train=0, num_val=0,
                            image_size=args.image_size, progress=False)
        dataset = load_manifest(tmp / "data" / "unlabeled.yaml")
        all_images = [(im.image_id, str(im.path.resolve())) for im in dataset.images]
        print(f"wrote {count} synthetic images (base size {args.image_size}) in "
              f"{time.perf_counter() - start:.1f} s")

        cases = [("classical", args.images, {})]
        if not args.skip_clip:
            cases.append((
                "clip", args.clip_images,
                {"input_size": args.input_size, "text_cache_file": str(tmp / "text.pt")},
            ))

        start = time.perf_counter()
        ensure_ray(None)
        ray_init_s = time.perf_counter() - start
        total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        actor_threads = max(1, int(cpus_per_worker(total_cpus, args.workers)))

        results: list[Measurement] = []
        forward = loop_s_per_image = None
        for proposer, n, options in cases:
            label = args.clip_model if proposer == "clip" else proposer
            images = all_images[:n]
            cfg = ProposeConfig(images=tmp / "data" / "unlabeled.yaml", out=tmp / "unused",
                                proposer=proposer, clip_model=args.clip_model, options=options,
                                random_weights=True,
                                shard_size=args.shard_size, batch_size=args.batch_size,
                                device="cpu")
            shards = [s.index for s in plan_shards(n, args.shard_size)]
            kwargs = {mode: worker_kwargs(cfg, images, tmp / f"{proposer}-{mode}")
                      for mode in ("loop", "ray", "warmup")}
            loop, worker = measure_loop(label, kwargs["loop"], shards)
            results.append(loop)
            print(f"{label}: loop done ({loop.images_per_s:.1f} images/s)", flush=True)
            if proposer == "clip":
                forward = vit_forward_seconds(worker.proposer, [p for _, p in images],
                                              args.input_size, args.batch_size, cfg.max_side)
                loop_s_per_image = loop.seconds / loop.images
            del worker
            # the same loop restricted to one thread (torch and OpenCV): the process-level
            # scaling baseline, since the default loop already spreads over the cores
            threads = torch.get_num_threads(), cv2.getNumThreads()
            torch.set_num_threads(1)
            cv2.setNumThreads(1)
            one, _ = measure_loop(label, kwargs["loop"], shards)
            torch.set_num_threads(threads[0])
            cv2.setNumThreads(threads[1])
            results.append(dataclasses.replace(one, mode="loop-1t"))
            print(f"{label}: 1-thread loop done ({one.images_per_s:.1f} images/s)", flush=True)
            results.append(measure_ray(label, kwargs["ray"], kwargs["warmup"], shards,
                                       args.workers))
            print(f"{label}: ray done ({results[-1].images_per_s:.1f} images/s)", flush=True)
        ray.shutdown()

    print(f"\nray.init: {ray_init_s:.1f} s (not in the table); {total_cpus:.0f} CPUs; loop: "
          f"{torch.get_num_threads()} torch threads; ray: {args.workers} actors, "
          f"{actor_threads} torch thread(s) each; shards of {args.shard_size} images, "
          f"batches of {args.batch_size}")
    print_table(results)
    ray_processes = [r.processes for r in results if r.mode == "ray"]
    print(f"distinct actor processes per Ray run: {ray_processes}")
    if forward is not None:
        print(f"{args.clip_model} forward alone (dense_clip_features, {args.input_size} px, "
              f"batch {args.batch_size}, {torch.get_num_threads()} threads): "
              f"{forward:.3f} s/image; whole loop {loop_s_per_image:.3f} s/image (forward "
              f"~{100 * forward / loop_s_per_image:.0f} %; timed one after the other, so noisy)")
    print("Targets: ray >= 1.7x loop; with ViT-B-16, rows % (work outside proposer.propose) "
          "< 25 %. Random ViT weights: speed only, never mask quality.")


if __name__ == "__main__":
    main()
