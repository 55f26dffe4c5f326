"""`magnet stack up | down | status`: the local stack in one command, bound to 127.0.0.1.

    prefect      `prefect server start` (SQLite under the state dir)
    mlflow       `mlflow server` (SQLite backend, local artifact store, proxied artifacts)
    deployments  one process serving prefect.yaml's `local` deployments (`flow.to_deployment` +
                 `serve`), so `prefect deployment run train-magnet/local --watch` runs here

The other deployments (`gpu-cluster`) run where prefect.yaml says: `prefect deploy` puts them on
their work pools, whose workers run them with the pool's job variables and the pull steps; this
process never serves them, so a `gpu-cluster` run never trains on the laptop by mistake.

Each service runs in its own session (process group) with a pid file and a log in the state
dir (default ./.magnet-stack); `down` signals exactly those groups, SIGTERM first.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILE = PROJECT_ROOT / "prefect.yaml"
HOST = "127.0.0.1"
SERVICES = ("prefect", "mlflow", "deployments")
LOCAL_DEPLOYMENT = "local"  # prefect.yaml's one-machine deployments; the others go to work pools
QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


class StackError(RuntimeError):
    """A service did not start, or its port is taken."""


@dataclass(frozen=True)
class Addresses:
    prefect_api: str
    mlflow: str

    @classmethod
    def load(cls, state_dir: Path) -> Addresses | None:
        path = state_dir / "addresses.json"
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def exports(self) -> str:
        return f"export PREFECT_API_URL={self.prefect_api}\nexport MLFLOW_TRACKING_URI={self.mlflow}"


# ------------------------------------------------------------------------------ processes
def _pid_file(state_dir: Path, service: str) -> Path:
    return state_dir / f"{service}.pid"


def _running_pid(state_dir: Path, service: str) -> int | None:
    """The service's pid if its pid file names a live process started with the recorded command."""
    path = _pid_file(state_dir, service)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    pid = int(record["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and record["marker"] not in cmdline.read_bytes().decode(errors="replace"):
        return None  # the pid was reused by something else
    return pid


def _start(state_dir: Path, service: str, argv: list[str], env: dict[str, str], marker: str) -> int:
    log = (state_dir / f"{service}.log").open("ab")
    process = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )
    _pid_file(state_dir, service).write_text(json.dumps({"pid": process.pid, "marker": marker, "argv": argv}))
    return process.pid


def _stop(state_dir: Path, service: str, timeout: float = 30.0) -> str:
    pid = _running_pid(state_dir, service)
    _pid_file(state_dir, service).unlink(missing_ok=True)
    if pid is None:
        return f"{service}: not running"
    os.killpg(pid, signal.SIGTERM)  # the service's own session: its group id is its pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return f"{service}: stopped (pid {pid})"
        time.sleep(0.25)
    os.killpg(pid, signal.SIGKILL)
    return f"{service}: killed after {timeout:.0f} s (pid {pid})"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((HOST, port)) != 0


def _wait_for(url: str, state_dir: Path, service: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _running_pid(state_dir, service) is None:
            raise StackError(f"{service} exited while starting; see {state_dir / (service + '.log')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise StackError(
        f"{service} did not answer {url} within {timeout:.0f} s; see {state_dir / (service + '.log')}"
    )


def _deployment_names(project_file: Path, *, local: bool) -> list[str]:
    """``flow/deployment`` of prefect.yaml's local deployments (the served ones), or of the others."""
    return [
        f"{flow.name}/{entry['name']}"
        for entry, flow in _project_deployments(project_file)
        if (entry["name"] == LOCAL_DEPLOYMENT) == local
    ]


# ---------------------------------------------------------------------------------- stack
def up(
    state_dir: Path,
    *,
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    project_file: Path = PROJECT_FILE,
    timeout: float = 180.0,
) -> str:
    """Start whatever of the three services is not running; return what to export and run."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    previous = Addresses.load(state_dir)
    if previous is not None and any(_running_pid(state_dir, s) for s in SERVICES):
        addresses = previous
    else:
        addresses = Addresses(f"http://{HOST}:{prefect_port}/api", f"http://{HOST}:{mlflow_port}")
    (state_dir / "addresses.json").write_text(json.dumps(addresses.__dict__))
    base_env = {**os.environ, **QUIET_ENV}
    base_env.pop("PREFECT_API_URL", None)
    bin_dir = Path(sys.executable).parent
    lines: list[str] = []

    if _running_pid(state_dir, "prefect") is None:
        port = int(addresses.prefect_api.rsplit(":", 1)[1].split("/")[0])
        if not _port_free(port):
            raise StackError(f"port {port} is in use; pick another with --prefect-port")
        env = {**base_env, "PREFECT_HOME": str(state_dir / "prefect")}
        argv = [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
        _start(state_dir, "prefect", argv, env, marker="server")
        lines.append(f"prefect: starting on {addresses.prefect_api}")
    if _running_pid(state_dir, "mlflow") is None:
        port = int(addresses.mlflow.rsplit(":", 1)[1])
        if not _port_free(port):
            raise StackError(f"port {port} is in use; pick another with --mlflow-port")
        argv = [
            str(bin_dir / "mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{state_dir / 'mlflow.db'}",
            "--artifacts-destination",
            str(state_dir / "mlartifacts"),
        ]
        _start(state_dir, "mlflow", argv, base_env, marker="mlflow")
        lines.append(f"mlflow: starting on {addresses.mlflow}")
    _wait_for(addresses.prefect_api + "/health", state_dir, "prefect", timeout)
    _wait_for(addresses.mlflow + "/health", state_dir, "mlflow", timeout)

    if _running_pid(state_dir, "deployments") is None:
        mlflow_env = {"MLFLOW_TRACKING_URI": addresses.mlflow, "MLFLOW_REGISTRY_URI": addresses.mlflow}
        env = {**base_env, "PREFECT_API_URL": addresses.prefect_api, **mlflow_env}
        argv = [sys.executable, "-m", "pipelines.stack", "serve", str(project_file.resolve())]
        _start(state_dir, "deployments", argv, env, marker="pipelines.stack")
        lines.append(f"deployments: serving {', '.join(_deployment_names(project_file, local=True))}")
    for name in _deployment_names(project_file, local=True):
        _wait_for(f"{addresses.prefect_api}/deployments/name/{name}", state_dir, "deployments", timeout)
    lines += [
        "",
        "ready. In your shell:",
        addresses.exports(),
        "prefect deployment run train-magnet/local --watch",
        "",
        "not served here (they run on their work pools' workers; infra/README.md, step 3):",
        ", ".join(_deployment_names(project_file, local=False)),
        "bash infra/prefect/pools.sh && prefect --no-prompt deploy --name gpu-cluster   # in the project dir",
        "prefect worker start --pool magnet-process   # and a worker of each other pool",
        "",
        f"Prefect UI: {addresses.prefect_api.removesuffix('/api')}   MLflow UI: {addresses.mlflow}",
        f"logs: {state_dir}/<service>.log; stop with: magnet stack down",
    ]
    return "\n".join(lines)


def down(state_dir: Path) -> str:
    """Stop the served deployments first (they pause themselves), then the servers."""
    state_dir = state_dir.resolve()
    return "\n".join(_stop(state_dir, service) for service in reversed(SERVICES))


def status(state_dir: Path) -> str:
    state_dir = state_dir.resolve()
    lines = []
    for service in SERVICES:
        pid = _running_pid(state_dir, service)
        lines.append(f"{service}: " + (f"running (pid {pid})" if pid else "not running"))
    addresses = Addresses.load(state_dir)
    if addresses is not None:
        lines += ["", addresses.exports()]
    return "\n".join(lines)


# ------------------------------------------------------------------------- the serve process
def _project_deployments(project_file: Path) -> list[tuple[dict[str, Any], Any]]:
    """prefect.yaml's deployment entries, each with its flow (imported by module path)."""
    spec = yaml.safe_load(project_file.read_text())
    found = []
    for entry in spec["deployments"]:
        path, _, function = entry["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        found.append((entry, getattr(module, function)))
    return found


def load_deployments(project_file: Path) -> list[Any]:
    """prefect.yaml's `local` deployments as RunnerDeployments (module-path entrypoints,
    cwd-independent). Their work pool is not used: this process is where they run."""
    from prefect.deployments.runner import EntrypointType

    return [
        flow.to_deployment(
            name=entry["name"],
            parameters=entry.get("parameters") or {},
            description=entry.get("description"),
            tags=entry.get("tags") or [],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for entry, flow in _project_deployments(project_file)
        if entry["name"] == LOCAL_DEPLOYMENT
    ]


def serve_deployments(project_file: Path) -> None:
    """Block serving the local deployments of ``project_file``; flow runs execute in subprocesses."""
    from prefect import serve

    serve(*load_deployments(project_file))


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "serve":
        raise SystemExit("usage: python -m pipelines.stack serve PREFECT_YAML")
    serve_deployments(Path(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
