"""`uplvp stage propose --ray-address` on a Ray cluster of two nodes, and the loss of one of them.

The module starts its own cluster on 127.0.0.1 with ``ray start --block``: a head node and a
worker node, 1 CPU each, each in its own process group and with its own ``--temp-dir`` (so a
plain ``ray.init()`` elsewhere on this machine neither finds nor joins it). The stage runs as a
real ``python -m stages.cli`` child, as a user runs it, against the head's GCS address.

Killing a node: every process of the worker node (its ``ray start``, raylet, agents and the
actor processes the raylet started) is SIGKILLed at once, as when the machine is lost. Which
actor runs which shard is made deterministic with the ``UPLVP_FAULT_INJECT`` hook
(``pipeline/faults.py``): only the worker node's processes see a rule (``@FILE``), which makes
its actor block in the first shard it gets, so the kill lands while that shard is in flight.
Teardown kills only the processes this module started (never ``ray stop``, which would stop
every Ray on the machine). What a user sees is documented in ``docs/propose.md``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.shards import shard_status
from pipeline.synth import write_synth_dataset
from stages.cli import app
from tests.helpers import free_port
from tests.helpers import REPO

pytest.importorskip("ray")
RAY_CLI = Path(sys.executable).parent / "ray"
if not RAY_CLI.is_file():
    pytest.skip("the `ray` command is not installed next to this Python", allow_module_level=True)

NUM_IMAGES = 12
SHARD_SIZE = 2  # 6 shards


# ----------------------------------------------------------------------------- the cluster


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (read from /proc before anything is killed: an
    orphan is re-parented and could no longer be found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group and every descendant of ``proc`` (Ray's actor
    processes are children of the raylet but not in its process group)."""
    pids = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() and not _is_zombie(pid) for pid in pids):
        assert time.monotonic() < deadline, "processes of a killed Ray node are still running"
        time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class TwoNodeCluster:
    """A head and a worker node (1 CPU each) started with ``ray start --block``."""

    def __init__(self, base: Path, worker_rule_file: Path):
        self.base = base
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("UPLVP_FAULT_INJECT", None)
        self.env.pop("RAY_ADDRESS", None)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.worker_rule_file = worker_rule_file
        self.nodes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        self._start("head", self.env, "--head", f"--port={self.port}",
                    "--include-dashboard=false", f"--ray-client-server-port={free_port()}")
        # only the worker node's processes (and so its actors) see the fault rule
        self._start("worker_node",
                    {**self.env, "UPLVP_FAULT_INJECT": f"@{self.worker_rule_file}"},
                    f"--address={self.address}")

    def _start(self, name: str, env: dict, *args: str) -> None:
        log = self.base / f"{name}.log"
        command = [
            str(RAY_CLI), "start", *args, "--block", "--num-cpus=1",
            f"--resources={json.dumps({name: 1})}", "--node-ip-address=127.0.0.1",
            "--object-store-memory=100000000", "--disable-usage-stats",
            "--include-log-monitor=false",
            f"--temp-dir={self.base / name}",
            # two nodes on one machine: no default port may be shared
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        ]
        with open(log, "w") as out:
            self.nodes[name] = subprocess.Popen(command, env=env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while "Ray runtime started." not in log.read_text():
            if self.nodes[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`ray start` of the {name} did not come up:\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self, name: str) -> None:
        _kill_tree(self.nodes.pop(name))

    def stop(self) -> None:
        for name in list(self.nodes)[::-1]:  # the worker node first, then the head
            self.kill(name)


@pytest.fixture(scope="module")
def cluster():
    """(the cluster, the worker node's fault rule file); all its processes killed at the end."""
    # a short folder under /tmp: Ray's socket paths (temp dir + session + socket) must stay
    # under the 107 characters of a Unix socket name
    base = Path(tempfile.mkdtemp(prefix="uplvp-2node-", dir="/tmp"))
    rule = base / "worker_rule.txt"
    rule.write_text("")
    two_nodes = TwoNodeCluster(base, rule)
    try:
        two_nodes.start()
        yield two_nodes, rule
    finally:
        two_nodes.stop()  # also the nodes of a start that failed half-way
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def manifest(cluster) -> Path:
    base = cluster[0].base
    write_synth_dataset(base / "synth", seed=3, num_unlabeled=NUM_IMAGES, num_train=1,
                        num_val=1, image_size=64, progress=False)
    path = base / "pool.yaml"
    path.write_text(f"name: pool\nimages: {{root: '{base / 'synth/unlabeled/images'}', "
                    "glob: '*.png'}\n")
    return path


def cli_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["stage", "propose", "--images", str(manifest), "--out", str(out), "--proposer",
            "classical", "--shard-size", str(SHARD_SIZE), "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference(manifest) -> Path:
    """The in-process run (``--num-workers 0``, no Ray)."""
    out = manifest.parent / "in_process"
    result = CliRunner().invoke(app, cli_args(manifest, out, "--num-workers", "0"))
    assert result.exit_code == 0, result.output
    return out


class Stage:
    """``python -m stages.cli stage propose ... --ray-address HEAD`` as a child process."""

    def __init__(self, cluster: TwoNodeCluster, manifest: Path, out: Path, *extra: str,
                 env: dict | None = None):
        self.log = out.parent / f"{out.name}.{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stages.cli",
                 *cli_args(manifest, out, "--ray-address", cluster.address, *extra)],
                env={**cluster.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO, start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout_s: float) -> tuple[int, str]:
        """(exit code, output with line wrapping undone); a stage still running after
        ``timeout_s`` is killed and the test fails (a hang)."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_tree(self.proc)
            pytest.fail(f"the stage hung (still running after {timeout_s} s):\n"
                        f"{self.log.read_text()[-3000:]}")
        return self.proc.returncode, " ".join(self.log.read_text().split())


def read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    masks = pd.read_parquet(out / "masks").sort_values(["image_id", "mask_index"])
    images = pd.read_parquet(out / "images").sort_values("image_id")
    return masks.reset_index(drop=True), images.reset_index(drop=True)


def assert_same_rows(out: Path, reference: Path) -> None:
    """Exactly the in-process rows: masks (RLE, boxes, scores), labels, embeddings."""
    masks, images = read(out)
    ref_masks, ref_images = read(reference)
    pd.testing.assert_frame_equal(masks, ref_masks)
    pd.testing.assert_frame_equal(images, ref_images)
    assert images.image_id.tolist() == list(range(1, NUM_IMAGES + 1))
    assert not list(out.rglob(".tmp-*"))


# ----------------------------------------------------------------------------- the tests


@pytest.mark.timeout(120)
def test_one_actor_asks_for_at_most_one_node_of_cpus(cluster):
    # one actor on two 1-CPU nodes: its share of the cluster (2 - 0.5 CPUs) fits on no node,
    # and `--num-workers 1` used to wait for it forever. The executor caps it at the largest
    # node's CPUs; a task asking for that many CPUs runs on the real cluster.
    ray_cluster, _ = cluster
    script = (
        "import ray\n"
        "from pipeline.executor import cpus_per_worker, largest_node_cpus\n"
        f"ray.init(address={ray_cluster.address!r}, logging_level='ERROR', "
        "log_to_driver=False)\n"
        "total, largest = ray.cluster_resources()['CPU'], largest_node_cpus()\n"
        "cpus = [cpus_per_worker(total, n, largest) for n in (1, 2)]\n"
        "ran = ray.get(ray.remote(lambda: 'ran').options(num_cpus=cpus[0]).remote(), timeout=60)\n"
        "print(total, largest, cpus[0], cpus[1], cpus_per_worker(total, 1), ran)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=ray_cluster.env, cwd=REPO,
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    # 2 CPUs in all, 1 per node; 1 actor: 1.0 (uncapped 1.5); 2 actors: 0.75 each, one a node
    assert result.stdout.split() == ["2.0", "1.0", "1.0", "0.75", "1.5", "ran"]


@pytest.mark.timeout(300)
def test_worker_node_killed_mid_run_then_rerun_gives_the_in_process_rows(cluster, manifest,
                                                                         reference):
    ray_cluster, rule = cluster
    out = ray_cluster.base / "killed"
    blocked = ray_cluster.base / "worker_blocked"
    # the worker node's actor blocks in the first shard it gets (and says so); the head's
    # actor is not affected
    rule.write_text(f"point=before-write,shard=*,action=block,flag={blocked}")
    # each of the 2 actors (0.75 CPU: one per node) gets a shard at the start: Ray Data waits
    # for both before handing out shards (otherwise the head's actor, up first, may do all)
    stage = Stage(ray_cluster, manifest, out, "--num-workers", "2",
                  env={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"})
    deadline = time.monotonic() + 150
    while not blocked.exists():
        assert stage.running(), f"the stage ended before the worker node got a shard: " \
                                f"{stage.finish(timeout_s=1)}"
        assert time.monotonic() < deadline, "the worker node's actor never got a shard"
        time.sleep(0.1)
    rule.write_text("")
    killed_at = time.monotonic()
    ray_cluster.kill("worker_node")  # the whole node, mid-shard

    code, output = stage.finish(timeout_s=120)
    seconds_to_exit = time.monotonic() - killed_at
    print(f"the stage exited {seconds_to_exit:.1f} s after the worker node was killed")
    record = json.loads((out / "stage.json").read_text())
    failed = record["counts"]["shards_failed"]
    complete = [k for k in range(NUM_IMAGES // SHARD_SIZE)
                if shard_status(out, k, record["config_hash"]) == "complete"]
    # what the user sees: Ray's retry lines, then one line per shard the run lost, exit 1
    assert code == 1, output
    assert "There are 2 retries remaining, so the task will be retried" in output
    assert failed and set(failed).isdisjoint(complete), (failed, complete)
    assert sorted(failed + complete) == list(range(NUM_IMAGES // SHARD_SIZE))  # each once
    for k in failed:
        assert (f"shard {k} failed: not completed: the Ray execution stopped when one shard "
                f"failed all 3 tries (its worker died or became unreachable: "
                f"ActorUnavailableError: The actor") in output
    assert "Traceback" not in output
    assert (f"failed {len(failed)}; on disk {len(complete)}/{NUM_IMAGES // SHARD_SIZE} shards"
            in output)

    # the rerun, same command, at once, on what is left of the cluster (the head node)
    print(f"rerun {time.monotonic() - killed_at:.1f} s after the kill")
    code, output = Stage(ray_cluster, manifest, out, "--num-workers", "2").finish(timeout_s=120)
    assert code == 0, output
    assert f"running {len(failed)} shard(s), {len(complete)} already complete" in output
    assert_same_rows(out, reference)
    counts = json.loads((out / "stage.json").read_text())["counts"]
    assert counts["shards_failed"] == [] and counts["shards_on_disk"] == NUM_IMAGES // SHARD_SIZE
