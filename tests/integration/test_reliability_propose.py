"""Reliability of `uplvp stage propose`: SIGKILL and rerun, worker faults on Ray, bad input.

Faults are injected deterministically through the ``UPLVP_FAULT_INJECT`` test hook
(``pipeline/faults.py``); killed runs are real subprocesses (``python -m stages.cli``).
The guarantees these tests prove are listed in ``docs/reliability_propose.md``.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.shards import shard_file, shard_status
from pipeline.synth import write_synth_dataset
from stages.cli import app

runner = CliRunner()
SHARD_SIZE = 3  # 7 images -> shards 0, 1, 2


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """7 synthetic 64x64 images (ids 1..7) and a manifest over them."""
    root = tmp_path_factory.mktemp("pool")
    write_synth_dataset(root / "synth", seed=3, num_unlabeled=7, num_train=1, num_val=1,
                        image_size=64, progress=False)
    path = root / "pool.yaml"
    path.write_text(f"name: pool\nimages: {{root: '{root / 'synth/unlabeled/images'}', "
                    "glob: '*.png'}\n")
    return path


def cli_args(manifest: Path, out: Path, *extra) -> list[str]:
    return ["stage", "propose", "--images", str(manifest), "--out", str(out), "--shard-size",
            str(SHARD_SIZE), "--no-progress", *map(str, extra)]


def propose(manifest: Path, out: Path, *extra):
    """Run the stage in this process (no fault hook); returns the CliRunner result."""
    return runner.invoke(app, cli_args(manifest, out, "--num-workers", "0", *extra))


def read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    masks = pd.read_parquet(out / "masks").sort_values(["image_id", "mask_index"])
    images = pd.read_parquet(out / "images").sort_values("image_id")
    return masks.reset_index(drop=True), images.reset_index(drop=True)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    result = propose(manifest, out)
    assert result.exit_code == 0, result.output
    return out


def assert_same_rows(out: Path, reference: Path) -> None:
    masks, images = read(out)
    ref_masks, ref_images = read(reference)
    pd.testing.assert_frame_equal(masks, ref_masks)
    pd.testing.assert_frame_equal(images, ref_images)
    assert images.image_id.tolist() == list(range(1, 8))  # no image missing, none twice
    assert not masks.duplicated(["image_id", "mask_index"]).any()
    assert not list(out.rglob(".tmp-*"))  # no temporary file left behind


# ----------------------------------------------------------------------------- kill and rerun


@pytest.mark.timeout(180)
@pytest.mark.parametrize("point", ["before-write", "mid-write", "between-files"])
def test_sigkill_at_a_point_then_rerun_equals_uninterrupted_run(point, manifest, reference,
                                                                 tmp_path):
    out = tmp_path / "out"
    flag = tmp_path / "blocked"
    env = {**os.environ, "UPLVP_FAULT_INJECT": f"point={point},shard=1,action=block,flag={flag}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.cli", *cli_args(manifest, out, "--num-workers", "0")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():  # the worker blocks at `point` of shard 1 and says so
            assert proc.poll() is None, f"the stage exited ({proc.returncode}) before {point}"
            assert time.monotonic() < deadline, f"the stage never reached {point}"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(timeout=30)

    # what the kill left: shard 0 complete, shard 1 not, and no file under a final name that
    # looks complete; readers see only whole files (temporary names start with '.')
    assert shard_status(out, 0, _run_hash(reference)) == "complete"
    assert not shard_file(out, "images", 1).exists()
    assert shard_file(out, "masks", 1).exists() == (point == "between-files")
    tmp_files = list((out / "masks").glob(".tmp-shard-00001.parquet.*"))
    assert len(tmp_files) == (1 if point == "mid-write" else 0)
    assert pd.read_parquet(out / "images").image_id.tolist() == [1, 2, 3]
    assert not (out / "stage.json").exists()

    result = propose(manifest, out)
    assert result.exit_code == 0, result.output
    assert "running 2 shard(s), 1 already complete" in flat(result.output)
    assert_same_rows(out, reference)
    counts = json.loads((out / "stage.json").read_text())["counts"]
    assert counts["shards_on_disk"] == 3 and counts["images_ok"] == 7


def _run_hash(out: Path) -> str:
    return json.loads((out / "stage.json").read_text())["config_hash"]


# ----------------------------------------------------------------------------- worker faults


def test_shard_that_always_raises_is_reported_and_the_rest_completes(manifest, reference,
                                                                      tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("UPLVP_FAULT_INJECT", "point=before-write,shard=1,action=raise")
    result = propose(manifest, out)
    assert result.exit_code == 1, result.output
    assert "shard 1 failed: RuntimeError: injected fault at before-write of shard 1" in flat(
        result.output)
    assert "Traceback" not in result.output
    record = json.loads((out / "stage.json").read_text())
    assert record["counts"]["shards_failed"] == [1]
    assert record["counts"]["shards_on_disk"] == 2
    assert [shard_status(out, k, record["config_hash"]) for k in range(3)] == [
        "complete", "missing", "complete"]
    # the rerun without the fault redoes only the failed shard
    monkeypatch.delenv("UPLVP_FAULT_INJECT")
    result = propose(manifest, out)
    assert result.exit_code == 0, result.output
    assert "running 1 shard(s), 2 already complete" in flat(result.output)
    assert_same_rows(out, reference)


# ----------------------------------------------------------------------------- bad input


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels (a decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_input_run(tmp_path_factory):
    """One run over a folder of good, odd and broken images; returns (out, images frame, result)."""
    root = tmp_path_factory.mktemp("bad input")
    images = root / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    scene = np.zeros((48, 64, 3), np.uint8)
    scene[8:30, 10:40] = (200, 40, 40)
    scene[20:44, 36:60] = (30, 180, 60)
    png = cv2.imencode(".png", scene)[1].tobytes()
    jpg = cv2.imencode(".jpg", scene)[1].tobytes()
    files = {
        "a_zero.png": b"",
        "b_truncated.png": png[: len(png) // 2],
        "c_truncated.jpg": jpg[: len(jpg) // 2],
        "d_text.jpg": b"this is not an image at all\n",
        "e_bomb.png": _png_header_only(100_000, 100_000),
        "f_good.png": png,
        "g name with spaces ü.png": png,
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    cv2.imwrite(str(images / "h_gray.png"), cv2.cvtColor(scene, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(images / "i_rgba.png"), cv2.cvtColor(scene, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(images / "j_16bit.png"), scene.astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 48x64 stored -> 64x48 shown
    Image.fromarray(scene[..., ::-1]).save(images / "k_exif.jpg", exif=exif.tobytes())
    huge = np.kron(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), np.ones((100, 100, 1),
                                                                           np.uint8))
    cv2.imwrite(str(images / "l_huge.jpg"), huge)  # 4000 x 6000
    manifest = root / "bad.yaml"
    manifest.write_text("name: bad\nimages: {root: imgs, glob: '*.*'}\n")
    out = root / "out"
    result = runner.invoke(app, cli_args(manifest, out, "--num-workers", "0", "--shard-size", "4",
                                         "--max-side", "96"))
    frame = pd.read_parquet(out / "images").sort_values("image_id").reset_index(drop=True)
    frame["name"] = frame.image_path.map(lambda p: Path(p).name)
    return out, frame.set_index("name"), result


def test_bad_images_become_error_rows_with_a_reason_and_the_run_succeeds(bad_input_run):
    out, images, result = bad_input_run
    assert result.exit_code == 0, result.output
    expected_errors = {
        "a_zero.png": "empty file (0 bytes)",
        "b_truncated.png": "not a decodable image",
        "c_truncated.jpg": "not a decodable image",
        "d_text.jpg": "not a decodable image",
        "e_bomb.png": "decoder refused the image (pixels <= CV_IO_MAX_IMAGE_PIXELS)",
    }
    errors = images[images.status == "error"]
    assert sorted(errors.index) == sorted(expected_errors)
    for name, reason in expected_errors.items():
        assert errors.loc[name, "error"].startswith(reason), errors.loc[name, "error"]
        assert errors.loc[name, "num_masks"] == 0 and pd.isna(errors.loc[name, "height"])
    assert "unreadable image" in result.output and "a_zero.png" in result.output
    assert "Traceback" not in result.output
    counts = json.loads((out / "stage.json").read_text())["counts"]
    assert (counts["images_ok"], counts["images_error"]) == (7, 5)


def test_odd_but_valid_images_are_processed_at_their_shown_size(bad_input_run):
    _, images, _ = bad_input_run
    ok = images[images.status == "ok"]
    shape = {name: (int(r.height), int(r.width)) for name, r in ok.iterrows()}
    assert shape == {
        "f_good.png": (48, 64),
        "g name with spaces ü.png": (48, 64),
        "h_gray.png": (48, 64),
        "i_rgba.png": (48, 64),
        "j_16bit.png": (48, 64),
        "k_exif.jpg": (64, 48),  # EXIF rotation applied
        "l_huge.jpg": (64, 96),  # 4000 x 6000 downscaled to --max-side 96
    }
    assert (ok.num_masks > 0).all()  # two coloured rectangles: every readable image has masks


# ----------------------------------------------------------------------------- stale shards


@pytest.fixture
def finished(reference, tmp_path) -> Path:
    """A copy of the uninterrupted run to damage."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    return out


def _rewrite_metadata(path: Path, **changes) -> None:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"uplvp"])
    meta.update(changes)
    pq.write_table(table.replace_schema_metadata({b"uplvp": json.dumps(meta).encode()}), path)


@pytest.mark.parametrize("damage", ["truncated", "other_hash", "other_version", "not_parquet"])
def test_damaged_or_stale_shard_is_redone_on_rerun(damage, manifest, reference, finished):
    path = shard_file(finished, "masks", 1)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "other_hash":
        _rewrite_metadata(path, config_hash="0123456789abcdef")
    elif damage == "other_version":
        _rewrite_metadata(path, format_version=99)
    else:
        path.write_bytes(b"garbage")
    assert shard_status(finished, 1, _run_hash(reference)) == "stale"
    result = propose(manifest, finished)
    assert result.exit_code == 0, result.output
    assert "running 1 shard(s), 2 already complete" in flat(result.output)
    assert_same_rows(finished, reference)


def test_folder_of_another_config_is_refused_in_one_line(manifest, finished):
    result = propose(manifest, finished, "--min-area", "40")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "holds shards of another config" in flat(result.output)
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- Ray actor death
# Last in this file: one local Ray for both tests; its actors read the fault rule from a file
# (``UPLVP_FAULT_INJECT=@FILE``) because their environment is fixed when Ray starts.


@pytest.fixture(scope="module")
def ray_fault_file(tmp_path_factory):
    ray = pytest.importorskip("ray")
    rule = tmp_path_factory.mktemp("fault") / "rule.txt"
    rule.write_text("")
    old = os.environ.get("UPLVP_FAULT_INJECT")
    os.environ["UPLVP_FAULT_INJECT"] = f"@{rule}"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield rule
    finally:
        ray.shutdown()
        if old is None:
            del os.environ["UPLVP_FAULT_INJECT"]
        else:
            os.environ["UPLVP_FAULT_INJECT"] = old


def propose_on_ray(manifest, out, rule_file: Path, rule: str):
    """Run the stage on 2 Ray actors with the fault ``rule`` in force, then clear the rule."""
    rule_file.write_text(rule)
    try:
        return runner.invoke(app, cli_args(manifest, out, "--num-workers", "2"))
    finally:
        rule_file.write_text("")


@pytest.mark.timeout(180)
def test_ray_actor_dying_mid_shard_once_is_retried(manifest, reference, tmp_path,
                                                   ray_fault_file):
    # the actor dies (os._exit) in the middle of shard 1 on its first attempt only: Ray
    # restarts the actor and retries the shard; the rows equal the uninterrupted run's
    flag = tmp_path / "died-once"
    out = tmp_path / "out"
    result = propose_on_ray(manifest, out, ray_fault_file,
                            f"point=before-write,shard=1,action=exit,flag={flag}")
    assert result.exit_code == 0, result.output
    assert flag.exists()  # the fault did fire
    assert_same_rows(out, reference)
    assert json.loads((out / "stage.json").read_text())["counts"]["shards_failed"] == []


@pytest.mark.timeout(180)  # unbounded retries (Ray Data's default) would hang here
def test_ray_actor_dying_every_time_exhausts_bounded_retries_and_is_reported(
        manifest, reference, tmp_path, ray_fault_file):
    # the actor dies on shard 1 at every attempt: after 1 + max_shard_retries (2) attempts Ray
    # Data stops; the stage reports every shard it did not see finish, exits 1, and the rerun
    # redoes exactly the shards that are not complete on disk
    out = tmp_path / "out"
    result = propose_on_ray(manifest, out, ray_fault_file,
                            "point=before-write,shard=1,action=exit")
    assert result.exit_code == 1, result.output
    assert ("shard 1 failed: not completed: the Ray execution stopped when one shard failed all "
            "3 tries (its worker died or became unreachable: ") in flat(result.output)
    assert "rerun the same command to redo the unfinished shards" in flat(result.output)
    assert "Traceback" not in result.output
    record = json.loads((out / "stage.json").read_text())
    assert 1 in record["counts"]["shards_failed"]
    on_disk = [k for k in range(3) if shard_status(out, k, record["config_hash"]) == "complete"]
    assert 1 not in on_disk
    assert sorted(on_disk + record["counts"]["shards_failed"]) == [0, 1, 2]  # each one, once
    result = propose(manifest, out)
    assert result.exit_code == 0, result.output
    assert f"running {3 - len(on_disk)} shard(s), {len(on_disk)} already complete" in flat(
        result.output)
    assert_same_rows(out, reference)
