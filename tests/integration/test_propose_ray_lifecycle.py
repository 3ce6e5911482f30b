"""A local Ray that `propose` starts itself is shut down when the shards are done (the demo
then trains on CPUs that idle Ray processes do not share); one it finds running is kept."""
import os

import pandas as pd
import pytest

from tests.helpers.propose import propose, read

ray = pytest.importorskip("ray")


@pytest.mark.timeout(240)
def test_propose_shuts_down_the_ray_it_started(pool, classical_run, tmp_path):  # noqa: F811
    os.environ["RAY_AUTH_MODE"] = "disabled"
    if ray.is_initialized():
        ray.shutdown()
    result = propose(pool, tmp_path / "ray", "--num-workers", "2")
    assert result.exit_code == 0, result.output
    assert not ray.is_initialized()
    for on_ray, in_process in zip(read(tmp_path / "ray"), read(classical_run)):
        pd.testing.assert_frame_equal(on_ray, in_process)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        result = propose(pool, tmp_path / "kept", "--num-workers", "2")
        assert result.exit_code == 0, result.output
        assert ray.is_initialized()  # the caller's Ray stays up
    finally:
        ray.shutdown()
