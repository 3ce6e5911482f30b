"""Forward+backward time and peak memory of one training step of the QEIS model.

Runs every (preset, decoder, input size) combination in a fresh subprocess and prints a table:

    .venv/bin/python -m benchmarks.model_step                      # tiny/small/base, 128 & 256 px
    .venv/bin/python -m benchmarks.model_step --presets tiny --sizes 64 128 --decoders knet

The step is ``model(images)`` then ``backward()`` of a synthetic loss touching every stage's
masks and logits (random weights, random images; no optimizer step). Time: the median and the
minimum of ``--repeats`` steps after one warm-up step (the minimum is less sensitive to other
load on a shared machine). Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (weights +
gradients + activations); on CPU the growth of the process's peak resident set size
(``ru_maxrss``) over its value after building the model, i.e. activations, gradients and
allocator overhead of the step.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import torch

from uplvp_model.config import model_config
from uplvp_model.model import build_model


@dataclass
class Result:
    preset: str
    decoder: str
    size: int
    params_m: float
    median_ms: float
    min_ms: float
    peak_mib: float


def synthetic_loss(outputs: dict) -> torch.Tensor:
    """A scalar depending on every stage's mask and class logits."""
    stages = [outputs, *outputs["aux_outputs"]]
    return sum(o["pred_masks"].float().square().mean() + o["pred_logits"].float().square().mean()
               for o in stages)


def measure(preset: str, decoder: str, size: int, batch: int, repeats: int, device: str,
            threads: int) -> Result:
    """Build the model and time ``repeats`` forward+backward steps (run in a child process)."""
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_config(preset, decoder=decoder)).to(device).train()
    images = torch.randn(batch, 3, size, size, device=device)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        synthetic_loss(model(images)).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    times = [step() for _ in range(repeats)]
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
    return Result(preset, decoder, size, params_m, 1000 * statistics.median(times),
                  1000 * min(times), peak_mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--decoders", nargs="+", default=["knet", "mask2former"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256],
                        help="square input sizes in pixels (multiples of 32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    memory = "peak alloc MiB" if device == "cuda" else "peak RSS +MiB"
    threads = args.threads or torch.get_num_threads()
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {threads} threads"
    print(f"device: {name}; batch {args.batch}; {args.repeats} fwd+bwd steps after 1 warm-up")
    header = (f"{'preset':<7} {'decoder':<12} {'size':>5} {'params M':>9} {'median ms':>10} "
              f"{'min ms':>9} {memory:>15}")
    print(header)
    print("-" * len(header))
    spawn = get_context("spawn")
    for preset in args.presets:
        for decoder in args.decoders:
            for size in args.sizes:
                with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                    r = pool.submit(measure, preset, decoder, size, args.batch, args.repeats,
                                    device, args.threads).result()
                print(f"{r.preset:<7} {r.decoder:<12} {r.size:>5} {r.params_m:>9.2f} "
                      f"{r.median_ms:>10.1f} {r.min_ms:>9.1f} {r.peak_mib:>15.1f}", flush=True)


if __name__ == "__main__":
    main()
