"""The MLflow server of infra/mlflow/serve.sh, used for real: PostgreSQL rows, S3 objects, registry."""

from __future__ import annotations

import base64
import secrets
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, running_mlflow

pytestmark = pytest.mark.slow


def _listen_addresses(port: int) -> set[str]:
    """Local addresses of every socket LISTENing on ``port`` (IPv4 and IPv6), from /proc/net."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: TCP_LISTEN
                if len(address) == 8:  # IPv4, little-endian hex
                    found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.add("ipv6:" + address)
    return found


def test_runs_and_registry_land_in_postgres_and_s3(mlflow_server, postgres_server, tmp_path):
    import fsspec
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    client = MlflowClient(mlflow_server.url, mlflow_server.url)
    name = f"infra-test-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"weights")
    notes = tmp_path / "notes.txt"
    notes.write_text("shards: s3://magnet/shards\n")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({"train.lr": 0.001, "model.name": "magnet"})
        for step in range(3):
            mlflow.log_metric("train/loss", 1.0 / (step + 1), step=step)
        mlflow.log_artifact(str(notes))
        mlflow.log_artifacts(str(model_dir), "model")
    run_id = run.info.run_id
    artifact_uri = client.get_run(run_id).info.artifact_uri
    # Clients never touch the bucket: the run's artifacts are proxied by the server.
    assert artifact_uri.startswith("mlflow-artifacts:")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{artifact_uri}/model", run_id=run_id).version
    client.set_registered_model_alias(name, "champion", version)

    # The artifacts are objects in the bucket, under the server's artifacts destination.
    fs = fsspec.filesystem("s3")
    prefix = mlflow_server.artifacts_destination.removeprefix("s3://")
    keys = [key for key in fs.find(prefix) if f"/{run_id}/artifacts/" in key]
    assert sorted(key.split("/artifacts/")[1] for key in keys) == ["model/model.pt", "notes.txt"]
    assert fs.cat(next(key for key in keys if key.endswith("notes.txt"))).decode() == notes.read_text()

    # The alias resolves, and the version's files come back through the server.
    assert client.get_model_version_by_alias(name, "champion").version == version
    downloaded = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl"))
    )
    assert (downloaded / "model.pt").read_bytes() == b"weights"

    # And the rows are in PostgreSQL.
    with postgres_server.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT key, value FROM params WHERE run_uuid = %s ORDER BY key", [run_id])
        assert cursor.fetchall() == [("model.name", "magnet"), ("train.lr", "0.001")]
        cursor.execute("SELECT step, value FROM metrics WHERE run_uuid = %s ORDER BY step", [run_id])
        assert cursor.fetchall() == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
        cursor.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", [name])
        assert cursor.fetchall() == [("champion", int(version))]
        cursor.execute("SELECT run_id FROM model_versions WHERE name = %s", [name])
        assert cursor.fetchall() == [(run_id,)]


def test_servers_listen_on_loopback_only(mlflow_server, postgres_server):
    assert _listen_addresses(mlflow_server.port) == {"127.0.0.1"}
    assert _listen_addresses(postgres_server.port) == {"127.0.0.1"}


@pytest.fixture(scope="module")
def basic_auth_server(postgres_server, s3_store, tmp_path_factory) -> Iterator[tuple[MlflowServer, str]]:
    """serve.sh with MLFLOW_AUTH=basic-auth on the same database; yields (server, admin password)."""
    password = secrets.token_urlsafe(16)
    env = {
        "MLFLOW_AUTH": "basic-auth",
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    log_dir = tmp_path_factory.mktemp("mlflow-auth")
    with running_mlflow(postgres_server, s3_store.url("mlflow-auth"), log_dir, env) as server:
        yield server, password


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_basic_auth_refuses_strangers_and_admits_the_admin(basic_auth_server, postgres_server):
    server, password = basic_auth_server
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(search) == 401
    assert _status(search, "admin", "wrong") == 401
    assert _status(search, "admin", password) == 200  # clients: MLFLOW_TRACKING_USERNAME/PASSWORD
    with postgres_server.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT username, is_admin FROM users")
        assert cursor.fetchall() == [("admin", True)]  # the auth app's users live in PostgreSQL too
