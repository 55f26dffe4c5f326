"""`magnet stack up`, then `prefect deployment run train-magnet/local --watch` exactly as a user
types it, against a real Prefect server, a real MLflow server and the served deployments; and a
pool deployment, deployed with `prefect deploy`, run by a worker of its pool against that stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port
from processes import stop_group
from tiny_runs import TINY_RUN

from data_prep.contract import read_summary

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = [*TINY_RUN, "eval.eval_size=64", "train.max_steps=2", "train.checkpoint_every=2"]


def _pid(state: Path, service: str) -> int:
    return json.loads((state / f"{service}.pid").read_text())["pid"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@dataclass(frozen=True)
class Stack:
    up_output: str
    state: Path
    api: str
    mlflow_port: int
    env: dict[str, str]  # a CLI user's shell after `up`: PREFECT_API_URL and MLFLOW_TRACKING_URI set


@pytest.fixture(scope="module")
def stack(module_tmp) -> Iterator[Stack]:
    """`magnet stack up` on free ports; `magnet stack down` after the module, which must stop
    every process it started."""
    root = module_tmp("stack")
    state = root / "stack"
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "true",
        "PREFECT_HOME": str(root / "prefect-client"),
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(name, None)
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
        mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        user_env = {**env, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_uri}
        yield Stack(up.stdout, state, api, mlflow_port, user_env)
        status = subprocess.run([*magnet, "status", *where], env=env, capture_output=True, text=True)
        assert status.stdout.count("running (pid") == 3
    finally:
        pids = {
            s: _pid(state, s) for s in ("prefect", "mlflow", "deployments") if (state / f"{s}.pid").exists()
        }
        down = subprocess.run([*magnet, "down", *where], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not [service for service, pid in pids.items() if _alive(pid)]


@pytest.mark.timeout(420)
def test_deployment_runs_by_name_on_the_local_stack(stack: Stack, tmp_path: Path):
    from mlflow import MlflowClient

    from data_prep.synthetic_shards import ensure_synthetic_shards

    shards = ensure_synthetic_shards(tmp_path / "data", images=20, image_size=64)
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
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, (
        run.stdout + run.stderr + (stack.state / "deployments.log").read_text()[-3000:]
    )
    assert "Completed" in run.stdout

    client = MlflowClient(f"http://127.0.0.1:{stack.mlflow_port}")
    experiment = client.get_experiment_by_name("stack-test")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED" and "val/oIoU" in mlflow_run.data.metrics
    (version,) = client.search_model_versions("name='magnet'")
    assert version.run_id == mlflow_run.info.run_id
    assert (stack.state / "mlartifacts").is_dir() and (stack.state / "mlflow.db").is_file()


def _deployment_exists(api: str, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/deployments/name/{name}", timeout=10) as response:
            return response.status == 200
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return False
        raise


@pytest.mark.timeout(420)
def test_pool_deployment_runs_on_a_worker_of_its_pool_not_in_the_stack(stack: Stack, tmp_path: Path):
    """`up` serves only the local deployments; a gpu-cluster one exists once `prefect deploy`
    puts it on its pool, and a process worker of that pool (not the stack) runs it."""
    from data_prep.synth import synthesize

    for name in ("train-magnet/gpu-cluster", "tune-magnet/gpu-cluster", "prepare-refcoco/gpu-cluster"):
        assert not _deployment_exists(stack.api, name), f"{name} is served on the laptop"
    assert _deployment_exists(stack.api, "train-magnet/local")

    def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, env=stack.env, capture_output=True, text=True, timeout=300, **kwargs)
        assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    run(["bash", str(ROOT / "infra" / "prefect" / "pools.sh")])
    run(["prefect", "--no-prompt", "deploy", "--name", "prepare-refcoco/gpu-cluster"], cwd=ROOT)
    assert not _deployment_exists(stack.api, "train-magnet/gpu-cluster")  # only what was deployed

    refer = tmp_path / "refer"
    synthesize(refer, num_images=6, image_size=64, seed=0, workers=1)
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [
            "prefect",
            "worker",
            "start",
            "--pool",
            "magnet-process",
            "--type",
            "process",
            "--name",
            "test-worker",
        ],
        env={**stack.env, "PREFECT_WORKER_QUERY_SECONDS": "2"},  # polls every 2 s, not 10
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        params = {"refer_root": str(refer), "out": str(tmp_path / "shards"), "show_progress": False}
        done = run(
            [
                "prefect",
                "deployment",
                "run",
                "prepare-refcoco/gpu-cluster",
                "--watch",
                "--params",
                json.dumps(params),
            ]
        )
        assert "Completed" in done.stdout, done.stdout
    finally:
        stop_group(worker)
        log.close()
    summary = read_summary(str(tmp_path / "shards" / "refcoco-unc"))
    assert sum(c.written for c in summary.counts.values()) > 0
    worker_log = (tmp_path / "worker.log").read_text()
    flow_run_id = next(line for line in done.stdout.splitlines() if "UUID" in line).split()[-1]
    assert flow_run_id in worker_log  # picked up by the pool's worker
    assert flow_run_id not in (stack.state / "deployments.log").read_text()  # not by the stack
