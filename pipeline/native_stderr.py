"""Drop known, harmless lines that native (C++) code writes straight to file descriptor 2.

Ray's core worker logs one ERROR line in the driver for every Ray Data actor it creates or
restarts (Ray Data always passes the actor's constructor arguments by reference and asks for
restarts): "... has constructor arguments in the object store and max_restarts > 0 ... the actor
restart will fail. See https://github.com/ray-project/ray/issues/53727". In our executor those
arguments are owned by the driver for the whole run, so the restart it warns about only fails if
the driver's own node is lost, which ends the run anyway; but the line reads like a failure in
every healthy log. It is written by C++ to fd 2, below Python's logging, so no logger setting
reaches it.

:func:`drop_native_stderr_lines` points fd 2 at a pipe for the duration of a block; a thread
forwards everything to the original stderr as it arrives, except complete lines that contain
one of the given markers (counted, so a caller can report them at debug level). Python's own
``sys.stderr`` is pointed at a duplicate of the original stream for the block when it was that
stream, so Python output bypasses the filter; where it cannot be (a rich bar's proxy holds it),
it goes through the filter unchanged. When stderr is a terminal, the filter is a
pseudo-terminal of the same size rather than a pipe, so ``isatty(2)`` and the terminal size
(what a progress bar asks) do not change inside the block.

Only processes started *before* the block keep the real stderr: start Ray first (a process
started inside the block would inherit the pipe). Not on Windows (no effect there).
"""
from __future__ import annotations

import io
import os
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

RAY_ACTOR_RESTART_ARGS = "has constructor arguments in the object store and max_restarts > 0"


@dataclass
class Dropped:
    """What a :func:`drop_native_stderr_lines` block held back."""
    lines: list[str] = field(default_factory=list)


_SEGMENT_END = re.compile(rb"(?<=[\r\n])")


def _filter_chunks(read_fd: int, write_fd: int, markers: Sequence[bytes], dropped: Dropped):
    """Copy ``read_fd`` to ``write_fd`` until EOF. Complete segments (ending in ``\n``, or in
    ``\r``, where a progress bar redraws) that contain one of ``markers`` are dropped; an
    unfinished segment is forwarded at once unless it could still become a marked line (it
    starts like Ray's log prefix ``[``)."""
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:  # a pseudo-terminal whose other end closed
            chunk = b""
        if not chunk:
            break
        *segments, pending = _SEGMENT_END.split(pending + chunk)
        out = []
        for segment in segments:
            if any(m in segment for m in markers):
                dropped.lines.append(segment.rstrip(b"\r\n").decode("utf-8", "replace"))
            else:
                out.append(segment)
        if pending and not pending.startswith(b"["):
            out.append(pending)
            pending = b""
        if out:
            _write_all(write_fd, b"".join(out))
    if pending:
        if any(m in pending for m in markers):
            dropped.lines.append(pending.decode("utf-8", "replace"))
        else:
            _write_all(write_fd, pending)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            written = os.write(fd, data)
        except OSError:
            return  # the original stderr is gone (closed terminal): nothing to show it to
        data = data[written:]


def _terminal_or_pipe(original: int) -> tuple[int, int]:
    """(read end, write end) for fd 2: a pseudo-terminal of the same size, in raw mode (bytes
    pass unchanged), when ``original`` is a terminal, so that code asking ``isatty(2)`` or the
    terminal's size (a progress bar) gets the same answers; else a pipe."""
    if os.isatty(original):
        try:
            import fcntl
            import termios
            import tty

            master, slave = os.openpty()
            tty.setraw(slave)
            size = fcntl.ioctl(original, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
            return master, slave
        except (ImportError, OSError):
            pass
    return os.pipe()


def _is_fd2(stream) -> bool:
    try:
        return stream is not None and stream.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


@contextmanager
def drop_native_stderr_lines(markers: Sequence[str]) -> Iterator[Dropped]:
    """Within the block, lines written to fd 2 that contain any of ``markers`` are dropped;
    everything else reaches the original stderr unchanged. Yields a :class:`Dropped`."""
    dropped = Dropped()
    if not markers or os.name != "posix":
        yield dropped
        return
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass
    original = os.dup(2)
    read_fd, write_fd = _terminal_or_pipe(original)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pump = threading.Thread(target=_filter_chunks, name="native-stderr-filter", daemon=True,
                            args=(read_fd, original, [m.encode() for m in markers], dropped))
    pump.start()
    swapped = None
    if sys.stderr is sys.__stderr__ and _is_fd2(sys.stderr):
        swapped = sys.stderr
        sys.stderr = open(os.dup(original), "w", buffering=1, encoding=swapped.encoding,
                          errors=swapped.errors or "backslashreplace", closefd=True)
    try:
        yield dropped
    finally:
        if swapped is not None:
            try:
                sys.stderr.flush()
                sys.stderr.close()
            finally:
                sys.stderr = swapped
        os.dup2(original, 2)  # the pipe's last write end closes: the pump reads EOF
        pump.join(timeout=5.0)
        os.close(read_fd) if not pump.is_alive() else None
        os.close(original)
