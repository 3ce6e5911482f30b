"""`uplvp stage propose` on Ray Data actors (local Ray with 2 CPUs): same rows as in-process."""
import os

import pandas as pd
import pytest

from tests.helpers.propose import propose, read

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_two_workers_give_the_in_process_rows(pool, classical_run, tmp_path):  # noqa: F811
    result = propose(pool, tmp_path / "ray", "--num-workers", "2")
    assert result.exit_code == 0, result.output
    for on_ray, in_process in zip(read(tmp_path / "ray"), read(classical_run)):
        pd.testing.assert_frame_equal(on_ray, in_process)


def test_ray_array_task_subset(pool, classical_run, tmp_path):  # noqa: F811
    result = propose(pool, tmp_path / "task1", "--num-workers", "2", "--shard-index", "1",
                     "--num-shards", "2")
    assert result.exit_code == 0, result.output
    masks, images = read(tmp_path / "task1")
    assert images.image_id.tolist() == [4, 5, 6]
    full, _ = read(classical_run)
    pd.testing.assert_frame_equal(masks, full[full.image_id.isin([4, 5, 6])].reset_index(drop=True))
