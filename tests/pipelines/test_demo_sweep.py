"""The demo's short sweep as `magnet demo` runs it, on a 2-core laptop: local Ray started the demo's
way, the loss-weight sweep file on the demo preset, and its two one-worker trials side by side
(a trial's driver takes no CPU of its own), each a child run of the sweep's run, none registered."""

from __future__ import annotations

import os

import pytest

from pipelines import tracking

pytestmark = pytest.mark.slow


@pytest.mark.timeout(420)  # a trial driver holding a CPU deadlocks both trials: fail, do not hang
def test_the_demo_sweep_runs_its_two_trials_side_by_side_on_two_cores(
    synthetic_shards, tmp_path, monkeypatch
):
    import ray

    from pipelines.demo import SWEEP_TRIALS, _start_ray, run_demo_sweep

    shards = synthetic_shards(num_images=16, image_size=64, seed=0, samples_per_shard=8)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with monkeypatch.context() as laptop:
        laptop.setattr(os, "cpu_count", lambda: 2)
        _start_ray()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        assert ray.cluster_resources()["CPU"] == 2
        result = run_demo_sweep(tmp_path, str(shards), tracking_uri=uri)
    finally:
        ray.shutdown()
    assert len(result.trials) == SWEEP_TRIALS == 2
    assert all(r["status"] == "FINISHED" and r["step"] == 6 for r in result.trials)
    assert result.best_run_id is None and result.model_version is None  # too short to register
    client = tracking.client_for(uri)
    first, second = (client.get_run(r["run_id"]) for r in result.trials)
    assert {run.data.tags["mlflow.parentRunId"] for run in (first, second)} == {result.parent_run_id}
    # side by side: each trial's run started before the other one ended
    assert max(first.info.start_time, second.info.start_time) < min(first.info.end_time, second.info.end_time)
