"""A real PostgreSQL and an MLflow tracking server on it, both on 127.0.0.1, for tests.

``postgres_server`` runs the installed PostgreSQL (``initdb`` + ``pg_ctl``) on a throw-away data
directory as the ``postgres`` user (PostgreSQL refuses to run as root), with password
authentication, and creates a role and a database for MLflow. ``mlflow_server`` starts the server
through ``infra/mlflow/serve.sh`` (so the script users run is what is tested) with that database as
the backend and the ``s3_store`` bucket (tests/object_store.py) as the proxied artifact store.
CI installs PostgreSQL first (scripts/ensure_postgres.sh); without it these fixtures skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest
from ports import HOST, free_port
from processes import stop_group

SERVE_SCRIPT = Path(__file__).resolve().parent.parent / "infra" / "mlflow" / "serve.sh"


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL and the role + database made for MLflow."""

    host: str
    port: int
    database: str
    user: str
    password: str

    def env(self) -> dict[str, str]:
        """The libpq variables serve.sh (and psql, psycopg2) connect with."""
        return {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGDATABASE": self.database,
            "PGUSER": self.user,
            "PGPASSWORD": self.password,
        }

    def connect(self):  # -> psycopg2 connection
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, dbname=self.database, user=self.user, password=self.password
        )


@dataclass(frozen=True)
class MlflowServer:
    """A tracking server started by serve.sh; ``url`` is what MLFLOW_TRACKING_URI takes."""

    url: str
    port: int
    pid: int
    artifacts_destination: str
    log: Path


def postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` (Debian's layout), else the directory of
    ``initdb`` on PATH; None when PostgreSQL's server binaries are not installed."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if candidates:
        return candidates[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


@contextlib.contextmanager
def running_postgres(database: str = "mlflow", user: str = "mlflow") -> Iterator[PostgresServer]:
    """initdb a fresh cluster, start it on a free loopback port, create ``user`` and ``database``."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "no PostgreSQL server binaries (initdb, pg_ctl): scripts/ensure_postgres.sh installs them"
        )
    # Not under pytest's tmp dirs: they are private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="magnet-postgres-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    superuser_password, password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    pwfile = root / "pwfile"
    pwfile.write_text(superuser_password + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
        shutil.chown(pwfile, "postgres")
    port = free_port()
    options = f"-c listen_addresses={HOST} -c port={port} -c unix_socket_directories={sockets} -c fsync=off"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        _run(
            _as_postgres(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--pwfile",
                    str(pwfile),
                    "--auth",
                    "scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ]
            ),
            "initdb",
        )
        pwfile.unlink()
        _run(
            _as_postgres([*pg_ctl, "-o", options, "-l", str(root / "postgres.log"), "-w", "start"]),
            "pg_ctl start",
        )
        import psycopg2
        from psycopg2 import sql

        admin = psycopg2.connect(
            host=HOST, port=port, dbname="postgres", user="postgres", password=superuser_password
        )
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(user)), [password]
            )
            cursor.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(user))
            )
        admin.close()
        yield PostgresServer(host=HOST, port=port, database=database, user=user, password=password)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_postgres([*pg_ctl, "-m", "immediate", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_health(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve.sh exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"MLflow did not answer {url}/health in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def _server_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment for an MLflow server, plus ``extra``, with MLflow's background
    work and telemetry off."""
    return {
        **os.environ,
        **extra,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # MLflow's GenAI job runner (online scoring, trace archival) serves nothing MagNet logs,
        # and its consumer outlives SIGTERM by ~20 s; users keep MLflow's default.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "DO_NOT_TRACK": "true",
        # The tests' interpreter's mlflow: found on PATH as users' images do.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@contextlib.contextmanager
def _serving(
    argv: list[str], env: Mapping[str, str], port: int, log: Path, timeout_s: float
) -> Iterator[subprocess.Popen]:
    """Run ``argv`` (an MLflow server on ``port``) until the block ends; yields the process once
    /health answers. The server and its uvicorn workers are stopped as a process group."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for_health(f"http://{HOST}:{port}", process, log, timeout_s)
        yield process
    finally:
        stop_group(process, timeout_s=20)


@contextlib.contextmanager
def running_mlflow(
    postgres: PostgresServer,
    artifacts_destination: str,
    log_dir: Path,
    extra_env: Mapping[str, str] = MappingProxyType({}),
    timeout_s: float = 120.0,
) -> Iterator[MlflowServer]:
    """``infra/mlflow/serve.sh`` with ``postgres`` as backend and ``artifacts_destination`` (s3://)
    as the artifact store; AWS_* (credentials, endpoint) are taken from this process's environment,
    ``extra_env`` adds serve.sh settings (e.g. MLFLOW_AUTH=basic-auth)."""
    port = free_port()
    env = _server_env(
        {
            **extra_env,
            **postgres.env(),
            "MLFLOW_ARTIFACTS_DESTINATION": artifacts_destination,
            "MLFLOW_PORT": str(port),
            "MLFLOW_WORKERS": "1",
        }
    )
    env.pop("MLFLOW_HOST", None)  # the default bind address is part of what is tested
    log = log_dir / f"mlflow-server-{port}.log"
    with _serving(["bash", str(SERVE_SCRIPT)], env, port, log, timeout_s) as process:
        yield MlflowServer(
            url=f"http://{HOST}:{port}",
            port=port,
            pid=process.pid,
            artifacts_destination=artifacts_destination,
            log=log,
        )


@contextlib.contextmanager
def running_mlflow_ui(backend_store_uri: str, log_dir: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """``mlflow server`` on a local store (the demo's SQLite file), as `magnet demo` tells users to
    look at it; yields the URL on 127.0.0.1."""
    port = free_port()
    argv = ["mlflow", "server", "--backend-store-uri", backend_store_uri, "--host", HOST, "--port", str(port)]
    log = log_dir / f"mlflow-ui-{port}.log"
    with _serving([*argv, "--workers", "1"], _server_env({}), port, log, timeout_s):
        yield f"http://{HOST}:{port}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL on 127.0.0.1 for the session, with role and database ``mlflow``."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(
    postgres_server: PostgresServer, s3_store, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """An MLflow tracking server for the session, started by infra/mlflow/serve.sh: PostgreSQL
    backend, artifacts under ``s3_store.url("mlflow")``. Tests set MLFLOW_TRACKING_URI to ``.url``."""
    log_dir = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow(postgres_server, s3_store.url("mlflow"), log_dir) as server:
        yield server
