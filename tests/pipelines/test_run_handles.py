"""The typed hand-offs: an MLflow run (`tracking.RunRef`) and a sweep's trial settings
(`sweep.trial.TrialSettings`) reach Ray's workers and Prefect's tasks pickled, so they must come
back equal and usable; neither crosses a JSON boundary (the flows return plain ids)."""

from __future__ import annotations

import pickle
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
from ray import cloudpickle

from magnet.config import load_config
from pipelines import tracking
from pipelines.sweep.trial import TrialSettings

PICKLERS = [pickle, cloudpickle]  # the standard library's, and Ray's (train_loop_config, Tune)


@pytest.fixture
def run(tmp_path: Path) -> tracking.RunRef:
    return tracking.RunRef(f"sqlite:///{tmp_path}/mlflow.db", "1", "0123456789abcdef")


@pytest.mark.parametrize("pickler", PICKLERS, ids=["pickle", "cloudpickle"])
def test_a_run_handle_round_trips_and_leaves_its_client_behind(run, pickler):
    client = run.client
    data = pickler.dumps(run)
    assert b"MlflowClient" not in data  # the client is per process, never pickled
    back = pickle.loads(data)
    assert back == run and back.client is client  # one client per store in a process
    with pytest.raises(FrozenInstanceError):
        back.run_id = "other"  # type: ignore[misc]


def test_a_trial_of_the_same_sweep_shares_the_store_and_experiment(run):
    child = run.in_same_experiment("fedcba9876543210")
    assert (child.tracking_uri, child.experiment_id, child.run_id) == (
        run.tracking_uri,
        run.experiment_id,
        "fedcba9876543210",
    )


@pytest.mark.parametrize("pickler", PICKLERS, ids=["pickle", "cloudpickle"])
def test_trial_settings_round_trip_with_their_config(run, pickler):
    settings = TrialSettings(
        config=load_config("tiny", ["train.lr=0.001"]),
        variants={"+MG": {"model.mask_grounding.enabled": True}},
        shards="/data/refcoco-unc",
        parent=run,
        experiment="magnet-sweeps",
        sweep_name="sweep-1",
        train_storage="/runs/sweep-1/train",
        num_workers=2,
        use_gpu=False,
        cpus_per_worker=1.0,
        max_failures=2,
    )
    back = pickle.loads(pickler.dumps(settings))
    assert back == settings
    assert back.config.train.lr == 0.001 and back.parent.client is run.client
