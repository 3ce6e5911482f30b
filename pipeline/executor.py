"""Run a per-shard worker over shard indices: in this process, or on Ray Data actors.

A *worker* is built once per process/actor (it holds the model) from ``worker_cls(**kwargs)``
and called as ``worker(shard_index) -> dict`` (a JSON-able summary of that shard). The worker
writes its own outputs; the executor only schedules and collects summaries.

Ray execution: ``ray.data.from_items(shards)`` -> ``map_batches(actor class, batch_size=1,
compute=ActorPoolStrategy(size=n))``. Actors ask for a fraction of a CPU each so that Ray Data's
own tasks are never starved (on 2 cores, actors holding every CPU deadlock the pipeline), never
more than the largest node has (an actor asking for more waits forever), and for
one GPU each only when the cluster has GPUs (asking for an absent GPU makes Ray wait forever).

Worker faults on Ray: a dead actor (killed process, node lost) is restarted without limit
(``max_restarts=-1``), and the shard it was running is retried on it at most
``max_shard_retries`` times (``max_task_retries``; Ray Data's default retries forever, which
turns a shard that always kills its process into an endless loop). When a shard runs out of
retries Ray Data stops the whole execution; every shard not yet reported is then yielded as a
failed summary carrying that error, so the caller reports them and a rerun redoes them.
A worker that *raises* is not a Ray fault: the worker itself returns a failed summary.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.native_stderr import RAY_ACTOR_RESTART_ARGS, drop_native_stderr_lines


@dataclass(frozen=True)
class ExecutorConfig:
    num_workers: int = 2  # 0 = run in this process, no Ray
    ray_address: str | None = None  # None: $RAY_ADDRESS if set, else a local Ray
    use_gpu: bool | None = None  # None: one GPU per actor iff the cluster has GPUs
    cpus_per_worker: float | None = None  # None: share the CPUs, leaving headroom
    max_shard_retries: int = 2  # reruns of a shard whose actor died while running it


def run_shards(
    shard_indices: list[int],
    worker_cls: type,
    worker_kwargs: dict[str, Any],
    config: ExecutorConfig,
) -> Iterator[dict]:
    """Yield one summary dict per shard, in completion order."""
    if not shard_indices:
        return
    if config.num_workers <= 0:
        worker = worker_cls(**worker_kwargs)
        for index in shard_indices:
            yield worker(index)
        return
    yield from _run_on_ray(shard_indices, worker_cls, worker_kwargs, config)


def _run_on_ray(shard_indices, worker_cls, worker_kwargs, config: ExecutorConfig):
    """Run the shards on Ray; a Ray this call started (local processes, or a connection to a
    cluster) is shut down when the shards are done, so the caller's later work (the demo's
    training) does not share the CPUs with idle Ray processes."""
    import ray

    started = ensure_ray(config.ray_address)  # before the filter: Ray's processes keep stderr
    try:
        # Ray's core worker logs one ERROR line per actor it creates or restarts, because Ray
        # Data passes actor arguments by reference while we ask for restarts (ray#53727); the
        # driver owns those arguments for the whole run, so the restart it warns about can only
        # fail with the driver's node, which ends the run anyway (pipeline/native_stderr.py)
        with drop_native_stderr_lines([RAY_ACTOR_RESTART_ARGS]) as dropped:
            yield from _run_on_ray_started(shard_indices, worker_cls, worker_kwargs, config)
        if dropped.lines:
            logging.getLogger(__name__).debug("dropped %d Ray line(s): %s", len(dropped.lines),
                                              dropped.lines[0])
    finally:
        if started:
            ray.shutdown()


def _run_on_ray_started(shard_indices, worker_cls, worker_kwargs, config: ExecutorConfig):
    import ray
    from ray.data import DataContext

    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 1.0))
    has_gpu = resources.get("GPU", 0) > 0
    use_gpu = has_gpu if config.use_gpu is None else (config.use_gpu and has_gpu)
    num_workers = max(1, min(config.num_workers, len(shard_indices)))
    cpus = config.cpus_per_worker or cpus_per_worker(total_cpus, num_workers,
                                                     largest_node_cpus())

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the stage shows its own bar
    ctx.verbose_progress = False
    # a failed execution is reported by this module in one line per shard: keep Ray Data's
    # own traceback logs of it off the console
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    # Large constructor arguments (the image list) go to the object store once, by reference,
    # so actors stay restartable and every actor gets the same object.
    kwargs_ref = ray.put(worker_kwargs)

    dataset = ray.data.from_items(
        [{"shard": int(i)} for i in shard_indices], override_num_blocks=len(shard_indices)
    )
    with warnings.catch_warnings():
        # the retry limits below can only be given as ray_remote_args (deprecated in Ray 2.60,
        # with no named replacement yet)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        results = _map_shards(dataset, worker_cls, kwargs_ref, num_workers, cpus, use_gpu, config)
    pending = set(int(i) for i in shard_indices)
    try:
        for row in results.iter_rows():
            summary = _unpack(row)
            pending.discard(summary["shard"])
            yield summary
    except Exception as err:  # Ray gave up (retries exhausted): report the unfinished shards
        reason = _first_line(err)
        for index in sorted(pending):
            yield {
                "shard": index,
                "status": "failed",
                "error": f"not completed: the Ray execution stopped when one shard failed all "
                f"{config.max_shard_retries + 1} tries (its worker died or became unreachable: "
                f"{reason}); rerun the same command to redo the unfinished shards",
                "seconds": 0.0,
                "worker_lost": True,  # it may still have written its files before the stop
            }


def _map_shards(dataset, worker_cls, kwargs_ref, num_workers: int, cpus: float, use_gpu: bool,
                config: ExecutorConfig):
    """The lazy Ray Data map of one-row ``{shard}`` batches to ``{summary}`` rows."""
    from ray.data import ActorPoolStrategy

    return dataset.map_batches(
        _RayShardActor,
        batch_size=1,
        batch_format="pandas",
        # one shard in flight per actor: otherwise the first ready actor queues several shards
        # while the others idle (measured: 2 shards on 2 actors ran on one of them)
        compute=ActorPoolStrategy(size=num_workers, max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs={
            "worker_cls": worker_cls,
            "worker_kwargs_ref": [kwargs_ref],  # in a list: Ray does not resolve nested refs
            "torch_threads": max(1, int(cpus)),
        },
        num_cpus=cpus,
        num_gpus=1 if use_gpu else 0,
        max_restarts=-1,
        max_task_retries=config.max_shard_retries,
    )


def cpus_per_worker(total_cpus: float, num_workers: int,
                    largest_node_cpus: float | None = None) -> float:
    """CPUs each actor asks for: an equal share of all but half a CPU (kept for Ray Data's
    read/scheduling tasks), at least 0.1, and at most the CPUs of the largest node: an actor
    runs on one node, and on a cluster the share of the total can exceed every node (one actor
    on two 1-CPU nodes asked for 1.5 CPUs and waited for them forever)."""
    share = max(0.1, round((total_cpus - 0.5) / num_workers, 2))
    if largest_node_cpus:
        share = min(share, largest_node_cpus)
    return share


def largest_node_cpus() -> float | None:
    """CPUs of the connected Ray cluster's largest live node (None: no node reports CPUs)."""
    import ray

    cpus = [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    return max(cpus, default=None) or None


def ensure_ray(address: str | None) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start a local Ray, unless already up.
    Returns whether this call connected (the caller then disconnects with ``ray.shutdown``)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address is None:
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    return True


class _RayShardActor:
    """Ray Data callable class: holds one worker, maps a one-row batch {shard} -> summary."""

    def __init__(self, worker_cls: type, worker_kwargs_ref: list, torch_threads: int):
        import cv2
        import ray
        import torch

        torch.set_num_threads(torch_threads)  # no oversubscription: threads = CPUs asked for
        cv2.setNumThreads(torch_threads)
        self.worker = worker_cls(**ray.get(worker_kwargs_ref[0]))

    def __call__(self, batch):
        import json

        import pandas as pd

        summaries = [json.dumps(self.worker(int(s))) for s in batch["shard"]]
        return pd.DataFrame({"summary": summaries})


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _unpack(row: dict) -> dict:
    import json

    return json.loads(row["summary"])

