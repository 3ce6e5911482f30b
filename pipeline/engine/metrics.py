"""Observability of a training run: ``metrics.jsonl``, TensorBoard events, a progress bar.

Only rank 0 writes (``enabled=False`` on the others makes every method but :meth:`message` a
no-op). Each ``metrics.jsonl`` line is one JSON object with a ``kind``:

- ``"train"``: ``step``, ``epoch``, ``lr``, the loss terms (window means, averaged over ranks),
  ``grad_norm``, ``step_seconds`` (mean wall time per optimizer step in the window),
  ``data_wait_share`` (share of that time spent waiting for the next batch), ``seconds`` (since
  this process started training), ``gpu_memory_gb`` (peak, CUDA only);
- ``"eval"``: ``step`` and the evaluation's values;
- ``"nonfinite"``: ``step`` (steps done so far), ``epoch``, ``batch`` (index of the group's last
  batch), ``reason`` (``"loss"`` | ``"grad"``), ``image_ids`` (every rank's, concatenated),
  ``action`` (``"skip"`` | ``"stop"``).

TensorBoard events go to ``tensorboard/`` (scalars ``train/<key>`` and ``eval/<key>``).
Progress: a rich bar where stderr is a terminal and ``progress`` is on; elsewhere (``| tee``, a
Slurm or CI log, or ``progress=False``) every ``"train"`` and ``"eval"`` record is also printed
as one plain line (detectron2's rhythm: one per ``log_every`` steps)::

    finetune step 50/600: loss 21.6 (bce 0.1659 ce 3.225 dice 1.323), lr 5.00e-04, 0.171 s/step, data 6%, ETA 0:01:25
    finetune eval step 50/600: segm_AP 0.0054, segm_AP50 0.0210, segm_AP75 0.0011
On resume from step k, lines and events after step k (written by the interrupted run after its
last checkpoint) are dropped, so both files read as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline.atomic import write_text_atomic
from pipeline.engine.progress import format_duration
from pipeline.errors import InputError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def truncate_metrics(path: str | Path, step: int) -> int:
    """Rewrite ``metrics.jsonl`` (atomically) keeping only lines with ``step <= step``, and a
    torn last line dropped; return the number of lines dropped (0 if the file is absent)."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


class RunLogger:
    """Writes metrics and drives the progress bar of one training run (see module docstring).

    ``start_step`` > 0 means a resumed run: later records of the previous run are dropped and
    the progress bar starts at ``start_step`` of ``total_steps``. ``label`` starts each plain
    line (the stage's name).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        progress: bool,
        tensorboard: bool,
        console: Console | None = None,
        label: str = "train",
    ) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.label, self.total_steps, self.start_step = label, total_steps, start_step
        self._metrics = None
        self._writer = None
        self._progress: Progress | None = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out_dir / METRICS_FILE, start_step)
        self._metrics = open(out_dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only where used

            self._writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
        if progress and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} it/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, loss="-", rate="-")
            self._progress.start()

    def message(self, text: str) -> None:
        """Print one line to the console (above the progress bar while it runs)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def advance(self, step: int, loss: float, steps_per_second: float | None) -> None:
        """Move the progress bar to ``step`` and show ``loss`` and the rate."""
        if self._progress is None:
            return
        rate = "-" if steps_per_second is None else f"{steps_per_second:.2f}"
        self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", rate=rate)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (holding ``kind`` and ``step``) to ``metrics.jsonl`` (non-finite
        floats, e.g. an fp16 overflow's grad_norm, as null: the file stays strict JSON); its
        finite numeric values also go to TensorBoard as ``<kind>/<key>`` at ``step``."""
        if not self.enabled:
            return
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}
        self._metrics.write(json.dumps(finite) + "\n")
        self._metrics.flush()
        if self._progress is None and record.get("kind") in ("train", "eval"):
            self.message(self.plain_line(record))
        if self._writer is None:
            return
        for key, value in record.items():
            if key in ("kind", "step") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def plain_line(self, record: dict[str, Any]) -> str:
        """The one-line form of a ``"train"`` or ``"eval"`` record (module docstring): the
        final layer's loss terms (aux layers are in metrics.jsonl), lr, s/step, share of time
        waiting for data, and the ETA from this process's mean time per step so far
        (evaluations included)."""
        step = record["step"]
        head = f"{self.label} {'eval ' if record['kind'] == 'eval' else ''}step {step}/{self.total_steps}"
        if record["kind"] == "eval":
            values = [(k.removeprefix("val/"), v) for k, v in record.items()
                      if k not in ("kind", "step") and isinstance(v, (int, float))]
            main = [(k, v) for k, v in values if k.endswith(("segm_AP", "segm_AP50", "segm_AP75"))]
            shown = ", ".join(f"{k} {v:.4f}" for k, v in (main or values[:4]))
            return f"{head}: {shown or 'no metrics'}"
        terms = " ".join(f"{k.removeprefix('loss_')} {_num(v)}" for k, v in sorted(record.items())
                         if k.startswith("loss_") and "_aux" not in k and isinstance(v, float))
        done = step - self.start_step
        seconds = record.get("seconds")
        eta = seconds / done * (self.total_steps - step) if done > 0 and seconds else None
        parts = [f"loss {_num(record.get('loss'))}" + (f" ({terms})" if terms else "")]
        if isinstance(record.get("lr"), float):
            parts.append(f"lr {record['lr']:.2e}")
        if isinstance(record.get("step_seconds"), float):
            parts.append(f"{record['step_seconds']:.3f} s/step")
        if isinstance(record.get("data_wait_share"), float):
            parts.append(f"data {100 * record['data_wait_share']:.0f}%")
        if isinstance(record.get("gpu_memory_gb"), float):
            parts.append(f"mem {record['gpu_memory_gb']:.2f} GiB")
        parts.append(f"ETA {format_duration(eta)}")
        return f"{head}: {', '.join(parts)}"

    def close(self) -> None:
        """Stop the progress bar and close the files (safe to call twice)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def _num(value: Any) -> str:
    """A loss value with 4 significant digits (``nan`` / ``-`` when not finite / missing)."""
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4g}" if math.isfinite(value) else "nan"


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file; a torn last line (a run killed mid-write) is
    skipped, any other bad line raises :class:`InputError` naming the line."""
    if not path.is_file():
        raise InputError("metrics file not found (is this a training run folder?)", path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise InputError(f"line {number} is not valid JSON", path) from None
        if not isinstance(record, dict) or not is_number(record.get("step")):
            raise InputError(f"line {number} has no numeric 'step'", path)
        records.append(record)
    return records


def ap_curve(path: Path, key: str = "val/segm_AP") -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` on every evaluation line of a ``metrics.jsonl``."""
    return [(int(r["step"]), float(r[key])) for r in read_metrics(Path(path))
            if r.get("kind") == "eval" and is_number(r.get(key))]


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
