"""Progress of long loops, for a terminal and for a log file alike.

On a terminal a rich bar redraws in place; where stderr is not a terminal (``| tee log``, a
Slurm or CI log) a bar would print nothing until the end, so plain lines are printed instead at
a steady rhythm::

    propose: 3/6 shards (50%), 150 images, 12.9 images/s, elapsed 0:00:12, ETA 0:00:12

Modes: ``"auto"`` (a bar on a terminal, lines elsewhere), ``"lines"`` (always lines: the CLI's
``--no-progress``), ``"off"`` (nothing: loops inside another stage, e.g. in-training validation).
"""
from __future__ import annotations

import time
from typing import Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

ProgressMode = Literal["auto", "lines", "off"]
LINES_PER_RUN = 20


def progress_mode(progress: bool) -> ProgressMode:
    """The mode of a stage's ``progress`` flag: True -> ``"auto"``, False (``--no-progress``)
    -> ``"lines"`` (no bar, the plain lines still go to the log)."""
    return "auto" if progress else "lines"


def shows_bar(mode: ProgressMode, console: Console) -> bool:
    """Whether ``mode`` draws a rich bar on ``console`` (only ``"auto"`` on a terminal)."""
    return mode == "auto" and console.is_terminal


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` (``-`` when unknown)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-"
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def line_every(total: int, lines: int = LINES_PER_RUN) -> int:
    """Items between two plain lines so that a run prints about ``lines`` of them."""
    return max(1, -(-total // lines))


class LoopProgress:
    """Progress of a loop over ``total`` items named ``unit`` (see the module docstring).

    ``with LoopProgress("propose", 6, "shards", console=console) as p: p.advance(1, images=50)``;
    ``images`` counts a secondary quantity whose rate is shown (``rate_unit``). A line is
    printed when the count crosses a multiple of :func:`line_every` (about 20 per run) at
    least ``min_seconds`` after the previous line, and after the last item: a loop of a few
    seconds prints two lines, a long one about 20.
    """

    def __init__(self, label: str, total: int, unit: str, *, console: Console,
                 mode: ProgressMode = "auto", rate_unit: str | None = None,
                 min_seconds: float = 5.0) -> None:
        self.label, self.total, self.unit, self.rate_unit = label, total, unit, rate_unit
        self.console, self.mode = console, mode
        self.done = 0
        self.secondary = 0
        self.every = line_every(total)
        self.min_seconds = min_seconds
        self._last_line: float | None = None
        self._bar: Progress | None = None
        self._task = None
        self._started = time.perf_counter()

    def __enter__(self) -> LoopProgress:
        self._started = time.perf_counter()
        if shows_bar(self.mode, self.console):
            self._bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn(self.unit),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                 console=self.console)
            self._task = self._bar.add_task(self.label, total=self.total, rate="")
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def advance(self, count: int = 1, secondary: int = 0) -> None:
        """``count`` more items done (and ``secondary`` more of the rate's unit)."""
        before = self.done
        self.done += count
        self.secondary += secondary
        elapsed = time.perf_counter() - self._started
        rate_count = self.secondary if self.rate_unit else self.done
        rate = rate_count / elapsed if elapsed > 0 else 0.0
        rate_text = f"{rate:.1f} {self.rate_unit or self.unit}/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=rate_text)
            return
        if self.mode == "off":
            return
        crossed = self.done // self.every > before // self.every
        spaced = self._last_line is None or elapsed - self._last_line >= self.min_seconds
        if not (self.done >= self.total or (crossed and spaced)):
            return
        self._last_line = elapsed
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = f", {self.secondary} {self.rate_unit}" if self.rate_unit else ""
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        self.console.print(
            f"{self.label}: {self.done}/{self.total} {self.unit}{share}{extra}, {rate_text}, "
            f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}",
            markup=False, highlight=False, soft_wrap=True)
