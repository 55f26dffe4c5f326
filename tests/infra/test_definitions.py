"""infra/ checked without a cluster: the manifests parse and carry what KubeRay, Ray's cluster
launcher, Prefect and Docker need; commands they run exist; secrets appear only as references;
servers bind to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SERVE = INFRA / "mlflow" / "serve.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Spec fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/{raycluster,rayjob}_types.go)
# that these manifests may use: a misspelt field is silently dropped by the API server.
RAYCLUSTER_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs",
}  # fmt: skip
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
    "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
WORKER_GROUP_FIELDS = {
    "groupName", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams", "replicas",
    "scaleStrategy", "suspend", "template", "idleTimeoutSeconds",
}  # fmt: skip


def _load(relative: str) -> dict:
    return yaml.safe_load((INFRA / relative).read_text())


def _ray_pin() -> str:
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")]
    return pin.split("==")[1]


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def _check_cli(argv: list[str]) -> None:
    """Parse ``magnet ...`` arguments with the real CLI, without running the command."""
    import typer

    from pipelines.cli import app

    assert argv[0] == "magnet", argv
    group = typer.main.get_command(app)
    context = group.make_context("magnet", argv[1:2])
    command = group.get_command(context, argv[1])
    assert command is not None, f"no command {argv[1]!r}"
    command.make_context(argv[1], argv[2:], parent=context)  # raises on an unknown option


# ----------------------------------------------------------------------------------- parsing
def test_every_definition_parses():
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert files
    for path in files:
        if path.suffix in {".yaml", ".yml"}:
            assert list(yaml.safe_load_all(path.read_text())), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".sh":
            subprocess.run(["bash", "-n", str(path)], check=True)


# ------------------------------------------------------------------------------------- KubeRay
def test_raycluster_has_what_kuberay_needs():
    cluster = _load("ray/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_FIELDS, set(spec) - RAYCLUSTER_FIELDS
    assert spec["rayVersion"] == _ray_pin()
    assert spec["authOptions"] == {"mode": "token"}  # Ray token authentication
    assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_groups = [
        g for g in spec["workerGroupSpecs"]
        if all(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
               for c in g["template"]["spec"]["containers"])
    ]  # fmt: skip
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    images = {c["image"] for c in _containers(spec)}
    assert len(images) == 1, images  # one image (infra/docker/Dockerfile) for head and workers
    for container in _containers(spec):
        refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert refs == {"magnet-config", "magnet-credentials"}, container["name"]
        assert "env" not in container or all(
            "value" not in e or not _secretish(e["name"]) for e in container["env"]
        )
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_rayjob_trains_on_object_storage_with_the_raycluster_spec():
    job = _load("ray/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job["spec"]) <= RAYJOB_FIELDS, set(job["spec"]) - RAYJOB_FIELDS
    # One cluster definition: the ephemeral cluster is the long-lived one's spec, field for field.
    assert job["spec"]["rayClusterSpec"] == _load("ray/raycluster.yaml")["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["magnet", "train"]
    assert argv[argv.index("--shards") + 1].startswith("s3://")
    assert argv[argv.index("--storage-path") + 1].startswith("s3://")
    assert "--use-gpu" in argv
    _check_cli(argv)


def test_kubernetes_config_holds_no_secret():
    config = _load("kubernetes/magnet-config.yaml")
    assert config["kind"] == "ConfigMap" and config["metadata"]["name"] == "magnet-config"
    assert not [key for key in config["data"] if _secretish(key)]


# ---------------------------------------------------------------------------------- ray up
def test_ray_up_file_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load("ray/cluster.yaml")
    validate_config(prepare_config(raw))  # the launcher's JSON schema; unknown keys are errors
    workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers), "no GPU node type"
    assert (
        raw["docker"]["image"]
        == _load("ray/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    )
    for command in raw["head_start_ray_commands"][1:] + raw["worker_start_ray_commands"][1:]:
        assert "export RAY_AUTH_MODE=token" in command
    (head_start,) = [c for c in raw["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "~/.ray/auth_token" in raw["file_mounts"]


# ------------------------------------------------------------------------------------ Docker
def test_dockerfile_installs_this_project_as_a_non_root_user():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    (base,) = [line.split("=", 1)[1] for line in lines if line.startswith("ARG BASE_IMAGE=")]
    assert base.startswith(f"rayproject/ray:{_ray_pin()}-py311") and "gpu" in base
    sources = []
    for line in lines:
        if line.startswith("COPY"):
            args = [a for a in line.split()[1:] if not a.startswith("--")]
            sources += args[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    for source in sources:  # everything copied is let through the ignore file
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source
    users = [line.split()[1] for line in lines if line.startswith("USER")]
    assert users and users[-1] not in {"root", "0"}
    installs = [line for line in lines if "pip install" in line]
    assert any('-e ".[server]"' in line for line in installs), installs
    assert "server" in PYPROJECT["project"]["optional-dependencies"]
    assert "magnet" in PYPROJECT["project"]["scripts"]  # the image's CMD and the manifests' entrypoints
    assert lines[-1] == 'CMD ["magnet", "--help"]'
    assert not [line for line in lines if line.startswith(("ENV", "ARG")) and _secretish(line.split()[1])]


DOCKER_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
TRAIN_V2 = {"name": "RAY_TRAIN_V2_ENABLED", "value": "1"}


def _dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments and blank lines dropped."""
    instructions, current = [], ""
    for line in (INFRA / "docker" / "Dockerfile").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        current += line.strip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            instructions.append(current.strip())
            current = ""
    return instructions


def test_ray_train_v2_is_set_explicitly_wherever_the_cluster_runs_it():
    """pipelines/train_driver.py is written for the Train V2 API: the image and every container of
    the RayCluster and the RayJob say so themselves instead of relying on Ray's default."""
    instructions = _dockerfile_instructions()
    assert [i for i in instructions if i.split()[0] not in DOCKER_INSTRUCTIONS] == []
    env = dict(
        pair.split("=", 1) for i in instructions if i.startswith("ENV ") for pair in shlex.split(i[4:])
    )
    assert env["RAY_TRAIN_V2_ENABLED"] == "1"
    for spec in (_load("ray/raycluster.yaml")["spec"], _load("ray/rayjob.yaml")["spec"]["rayClusterSpec"]):
        for container in _containers(spec):
            assert TRAIN_V2 in container.get("env", []), container["name"]


# ----------------------------------------------------------------------------------- Prefect
def _pools() -> dict[str, str]:
    """Work pool name -> type, as infra/prefect/pools.sh creates them."""
    found = re.findall(r"work-pool create (\S+) --type (\S+)", (INFRA / "prefect" / "pools.sh").read_text())
    return dict(found)


def _kubernetes_template() -> dict:
    return json.loads((INFRA / "prefect" / "kubernetes-base-job-template.json").read_text())


def test_prefect_deployments_target_the_pools_infra_defines():
    pools = _pools()
    assert pools == {"magnet-process": "process", "magnet-kubernetes": "kubernetes"}
    variables = set(_kubernetes_template()["variables"]["properties"])
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    names = {(d["entrypoint"], d["name"]) for d in deployments}
    assert len(names) == len(deployments)
    on_kubernetes = []
    for deployment in deployments:
        pool = deployment["work_pool"]["name"]
        assert pool in pools, f"{deployment['name']}: unknown work pool {pool}"
        if pools[pool] == "kubernetes":
            on_kubernetes.append(deployment)
            assert set(deployment["work_pool"].get("job_variables", {})) <= variables
            (step,) = deployment["pull"]
            assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "/home/ray/magnet"
            assert str(deployment["parameters"]["shards"]).startswith("s3://")
    assert {d["entrypoint"].split(":")[1] for d in on_kubernetes} == {"train_magnet", "tune_magnet"}


def test_kubernetes_template_extends_the_workers_default():
    """Every key and variable of the kubernetes worker's own default template is kept, and every
    placeholder refers to a declared variable (the server refuses the pool otherwise)."""
    registry = Path(__import__("prefect").__file__).parent / "server/api/collections_data/views"
    default = json.loads((registry / "aggregate-worker-metadata.json").read_text())["prefect-kubernetes"][
        "kubernetes"
    ]["default_base_job_configuration"]
    ours = _kubernetes_template()
    assert set(default["job_configuration"]) <= set(ours["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(ours["job_configuration"])))
    assert placeholders <= set(ours["variables"]["properties"]), placeholders - set(
        ours["variables"]["properties"]
    )
    container = ours["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "{{ credentials_secret }}"}} in container["envFrom"]
    assert (
        ours["variables"]["properties"]["image"]["default"]
        == _load("ray/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    )


# -------------------------------------------------------------------------------- serve.sh
SERVE_ENV = {
    "PGHOST": "db.internal",
    "PGPORT": "5433",
    "PGDATABASE": "mlflow",
    "PGUSER": "mlflow",
    "PGPASSWORD": "pw-from-env",
    "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlflow",
    "AWS_ACCESS_KEY_ID": "id-from-env",
    "AWS_SECRET_ACCESS_KEY": "key-from-env",
}


def _serve(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run serve.sh with a stand-in `mlflow` on PATH that prints its arguments and the auth config."""
    fake = tmp_path / "bin" / "mlflow"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(
        '#!/bin/sh\nprintf "%s\\n" "$@"\n'
        '[ -n "$MLFLOW_AUTH_CONFIG_PATH" ] && cat "$MLFLOW_AUTH_CONFIG_PATH"\nexit 0\n'
    )
    fake.chmod(0o755)
    path = f"{fake.parent}{os.pathsep}/usr/bin{os.pathsep}/bin"
    return subprocess.run(["bash", str(SERVE)], env={"PATH": path, **env}, capture_output=True, text=True)


REQUIRED = ["PGHOST", "PGDATABASE", "PGUSER", "PGPASSWORD", "MLFLOW_ARTIFACTS_DESTINATION",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]  # fmt: skip


@pytest.mark.parametrize("missing", REQUIRED)
def test_serve_refuses_naming_the_missing_variable(missing, tmp_path):
    result = _serve({k: v for k, v in SERVE_ENV.items() if k != missing}, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"serve.sh: {missing} is not set")
    assert result.stdout == ""  # mlflow was never started


def test_serve_refuses_a_local_artifact_store_and_half_configured_auth(tmp_path):
    result = _serve({**SERVE_ENV, "MLFLOW_ARTIFACTS_DESTINATION": "./mlartifacts"}, tmp_path)
    assert result.returncode == 2 and "must be an s3:// URL" in result.stderr
    result = _serve({**SERVE_ENV, "MLFLOW_AUTH": "basic-auth"}, tmp_path)
    assert result.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD is not set" in result.stderr


def test_serve_binds_loopback_and_keeps_secrets_off_the_command_line(tmp_path):
    result = _serve(SERVE_ENV, tmp_path)
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert (
        argv[argv.index("--backend-store-uri") + 1] == "postgresql+psycopg2://mlflow@db.internal:5433/mlflow"
    )
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert "--serve-artifacts" in argv
    for secret in ("pw-from-env", "key-from-env"):
        assert secret not in result.stdout + result.stderr

    exposed = _serve(
        {**SERVE_ENV, "MLFLOW_HOST": "0.0.0.0", "MLFLOW_ALLOWED_HOSTS": "mlflow.example.org"}, tmp_path
    )
    argv = exposed.stdout.splitlines()
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--allowed-hosts") + 1] == "mlflow.example.org"


def test_serve_basic_auth_config_holds_no_secret(tmp_path):
    env = {**SERVE_ENV, "MLFLOW_AUTH": "basic-auth", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw-from-env",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-from-env"}  # fmt: skip
    result = _serve(env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--app-name\nbasic-auth" in result.stdout
    assert "database_uri = postgresql+psycopg2://mlflow@db.internal:5433/mlflow" in result.stdout
    for secret in ("pw-from-env", "admin-pw-from-env", "csrf-from-env"):
        assert secret not in result.stdout


# ------------------------------------------------------------------------ security defaults
_SECRET_NAME = re.compile(r"(?i)(passw(or)?d|secret|token|private.?key|access.?key)")
_NAME = r"[\w.-]*(?:passw(?:or)?d|secret|token|access.?key)[\w.-]*"
_LITERAL = r"[A-Za-z0-9][^\s\"',}]*"  # not $VAR, {{ var }}, <placeholder>, ~/path, /path, a structure
# `key: value` / `key = value` on a line that is not a comment (YAML, JSON, ini) ...
_KEY_VALUE = re.compile(rf"""^\s*(?:-\s*)?["']?({_NAME})["']?\s*[:=]\s*["']?({_LITERAL})""", re.I | re.M)
# ... and NAME=value anywhere, comments and docs included (shell, --from-literal=, env files).
_ENV_VALUE = re.compile(rf"""\b({_NAME})=["']?({_LITERAL})""", re.I)


def _secretish(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def secret_literals(text: str) -> list[str]:
    """Assignments whose name says secret and whose value is a literal, and key-shaped strings."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    pairs = _KEY_VALUE.findall(code) + _ENV_VALUE.findall(text)
    hits = sorted({f"{name}={value}" for name, value in pairs if not re.search(r"(?i)secret(ref)?$", name)})
    return hits + re.findall(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----", text)


def test_the_secret_scan_finds_literals_and_passes_references():
    assert secret_literals("PGPASSWORD=hunter2") == ["PGPASSWORD=hunter2"]
    assert secret_literals("  aws_secret_access_key: abc123") == ["aws_secret_access_key=abc123"]
    assert secret_literals("key = AKIAABCDEFGHIJKLMNOP") == ["AKIAABCDEFGHIJKLMNOP"]
    assert secret_literals("# export MLFLOW_TRACKING_PASSWORD=s3cret") == ["MLFLOW_TRACKING_PASSWORD=s3cret"]
    assert secret_literals("# Secrets: the nodes reach S3 ...\nx=${AWS_WEB_IDENTITY_TOKEN_FILE:-}") == []
    assert secret_literals('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"') == []
    assert secret_literals("RAY_AUTH_TOKEN: {{ token }}\n~/.ray/auth_token: ~/.ray/auth_token") == []


def test_no_secret_literal_in_infra():
    files = [*INFRA.rglob("*"), ROOT / "prefect.yaml"]
    found = {
        str(path.relative_to(ROOT)): hits
        for path in files
        if path.is_file() and (hits := secret_literals(path.read_text()))
    }
    assert found == {}


def test_servers_default_to_loopback():
    from pipelines import stack

    assert stack.HOST == "127.0.0.1"
    for path in (ROOT / "pipelines").rglob("*.py"):
        assert "0.0.0.0" not in path.read_text(), path
    assert 'host="${MLFLOW_HOST:-127.0.0.1}"' in SERVE.read_text()


def _torch_loads(package: str) -> list[tuple[str, int, ast.Call]]:
    calls = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls.append((str(path.relative_to(ROOT)), node.lineno, node))
    return calls


def test_checkpoints_load_with_weights_only():
    for package in ("magnet", "pipelines", "data_prep"):
        for path, _, call in _torch_loads(package):
            flag = {k.arg: k.value for k in call.keywords}.get("weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, (
                f"{path}:{call.lineno}: torch.load without weights_only=True"
            )


def test_refs_pickles_only_through_the_restricted_unpickler():
    for package in ("magnet", "pipelines", "data_prep"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = ast.unparse(node.func)
                    assert name not in {"pickle.load", "pickle.loads", "pickle.Unpickler"}, (
                        f"{path}:{node.lineno}"
                    )
    source = (ROOT / "data_prep" / "refer.py").read_text()
    assert "class _PlainDataUnpickler(pickle.Unpickler)" in source and "def find_class" in source
