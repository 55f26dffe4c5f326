"""`magnet stack up`, then `prefect deployment run train-magnet/local --watch` exactly as a user
types it, against a real Prefect server, a real MLflow server and the served deployments."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY = [
    "model.image_size=64",
    "data.batch_size=2",
    "data.loader_workers=0",
    "eval.eval_size=64",
    "train.max_steps=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid(state: Path, service: str) -> int:
    return json.loads((state / f"{service}.pid").read_text())["pid"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.timeout(420)
def test_deployment_runs_by_name_on_the_local_stack(tmp_path: Path):
    from mlflow import MlflowClient

    from pipelines.demo import ensure_synthetic_shards

    shards = ensure_synthetic_shards(tmp_path / "data", images=20, image_size=64)
    state = tmp_path / "stack"
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "true",
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_REGISTRY_URI", None)
    magnet = [str(BIN / "magnet"), "stack"]
    where = ["--state-dir", str(state)]
    up = subprocess.run(
        [*magnet, "up", *where, "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        api = f"http://127.0.0.1:{prefect_port}/api"
        assert f"export PREFECT_API_URL={api}" in up.stdout
        params = {
            "config": "tiny",
            "shards": str(shards),
            "overrides": TINY,
            "num_workers": 1,
            "experiment": "stack-test",
            "storage_path": str(tmp_path / "ray"),
            "eval_splits": ["val"],
        }
        run = subprocess.run(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                "train-magnet/local",
                "--watch",
                "--params",
                json.dumps(params),
            ],
            env={**env, "PREFECT_API_URL": api},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr + (state / "deployments.log").read_text()[-3000:]
        assert "Completed" in run.stdout

        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name("stack-test")
        (mlflow_run,) = client.search_runs([experiment.experiment_id])
        assert mlflow_run.info.status == "FINISHED" and "val/oIoU" in mlflow_run.data.metrics
        (version,) = client.search_model_versions("name='magnet'")
        assert version.run_id == mlflow_run.info.run_id
        assert (state / "mlartifacts").is_dir() and (state / "mlflow.db").is_file()
        status = subprocess.run([*magnet, "status", *where], env=env, capture_output=True, text=True)
        assert status.stdout.count("running (pid") == 3
    finally:
        pids = {
            s: _pid(state, s) for s in ("prefect", "mlflow", "deployments") if (state / f"{s}.pid").exists()
        }
        down = subprocess.run([*magnet, "down", *where], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not [service for service, pid in pids.items() if _alive(pid)]
