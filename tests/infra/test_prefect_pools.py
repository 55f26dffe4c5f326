"""infra/prefect/pools.sh and prefect.yaml against a real Prefect server: the pools are accepted
(the server validates the Kubernetes base job template) and every deployment lands on its pool."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prefect_server import prefect_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
POOLS = ROOT / "infra" / "prefect" / "pools.sh"


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server on 127.0.0.1 in its own process, and the environment a CLI user would have."""
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server.wait()


def _run(argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_pools_script_refuses_without_a_server():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(["bash", str(POOLS)], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "PREFECT_API_URL is not set" in result.stderr


def test_pools_and_deployments_on_a_real_server(prefect_env):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _run(["bash", str(POOLS)], prefect_env)
    _run(["prefect", "--no-prompt", "deploy", "--all"], prefect_env)

    template = json.loads((ROOT / "infra" / "prefect" / "kubernetes-base-job-template.json").read_text())
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    with (
        temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        kubernetes = client.read_work_pool("magnet-kubernetes")
        assert kubernetes.type == "kubernetes"
        assert kubernetes.base_job_template == template
        assert client.read_work_pool("magnet-process").type == "process"
        served = {(d.entrypoint, d.name): d for d in client.read_deployments()}
    assert len(served) == len(spec)
    for entry in spec:
        deployment = served[(entry["entrypoint"], entry["name"])]
        assert deployment.work_pool_name == entry["work_pool"]["name"]
        assert deployment.job_variables == entry["work_pool"].get("job_variables", {})
        assert deployment.parameters == entry["parameters"]
        if "pull" in entry:
            assert deployment.pull_steps == entry["pull"]
