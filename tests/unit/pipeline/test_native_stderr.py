"""pipeline.native_stderr: only marked complete lines written to fd 2 are dropped."""
import os
import sys

import pytest

from pipeline.native_stderr import RAY_ACTOR_RESTART_ARGS, drop_native_stderr_lines

pytestmark = pytest.mark.skipif(os.name != "posix", reason="fd 2 filtering is POSIX-only")

RAY_LINE = (b"[2026-12-06 04:15:13,054 E 2286 2286] core_worker.cc:2465: Actor with class name: "
            b"'MapWorker(MapBatches(_RayShardActor))' and ID: '48146396f5' " +
            RAY_ACTOR_RESTART_ARGS.encode() + b". If the arguments ...\n")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def test_marked_lines_are_dropped_and_the_rest_passes_in_order(capfd):
    before = os.fstat(2)
    fds = open_fds()
    with drop_native_stderr_lines([RAY_ACTOR_RESTART_ARGS]) as dropped:
        os.write(2, b"first line\n")
        os.write(2, RAY_LINE)
        os.write(2, b"progress 1/3\r")  # a partial line: forwarded without waiting for \n
        os.write(2, RAY_LINE[:40])  # a marked line that arrives in two writes
        os.write(2, RAY_LINE[40:] + b"[not marked] kept\n")
        os.write(2, b"no newline at the end")
    after = os.fstat(2)
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)  # fd 2 is back
    assert open_fds() == fds  # nothing leaked
    err = capfd.readouterr().err
    assert err == "first line\nprogress 1/3\r[not marked] kept\nno newline at the end"
    assert len(dropped.lines) == 2
    assert all(RAY_ACTOR_RESTART_ARGS in line for line in dropped.lines)


def test_python_stderr_keeps_working_inside_and_after(capfd):
    with drop_native_stderr_lines([RAY_ACTOR_RESTART_ARGS]):
        print("from python", file=sys.stderr)
        sys.stderr.flush()
        os.write(2, RAY_LINE)
    print("after", file=sys.stderr)
    sys.stderr.flush()
    assert capfd.readouterr().err == "from python\nafter\n"


def test_no_markers_changes_nothing(capfd):
    with drop_native_stderr_lines([]) as dropped:
        os.write(2, RAY_LINE)
    assert capfd.readouterr().err == RAY_LINE.decode()
    assert dropped.lines == []
