"""The registry: a checkpoint logged as a pyfunc with its raw weights, registered as versions of
`magnet`, and loaded back through every kind of reference."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from contract_files import fake_summary, write_summary
from PIL import Image
from ports import free_port

from magnet.checkpoint import MODEL_FILE, TRAIN_STATE_FILE
from magnet.config import load_config
from magnet.inference import predict
from pipelines import registry, tracking

MAGNET = str(Path(sys.executable).with_name("magnet"))
EXPRESSION = "the left square"
# Run by a Python without the project: loads the registered model through MLflow, predicts once,
# and reports where the project's modules came from and what they imported from outside.
LOAD_AND_PREDICT = """
import builtins, importlib.metadata, json, sys
imported = set()
real_import = builtins.__import__
def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = str((globals or {}).get("__name__", "")).partition(".")[0]
    if level == 0 and importer in {"data_prep", "magnet", "pipelines"}:
        imported.add(name.partition(".")[0])
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = recording_import
import mlflow, pandas
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pandas.DataFrame({"image": [open(sys.argv[2], "rb").read()], "text": [sys.argv[3]]}))
import data_prep, magnet, pipelines
owners = importlib.metadata.packages_distributions()
outside = imported - set(sys.stdlib_module_names) - {"data_prep", "magnet", "pipelines"}
print(json.dumps({
    "files": [data_prep.__file__, magnet.__file__, pipelines.__file__],
    "owners": {name: owners.get(name, [name]) for name in sorted(outside)},
    "mask_bytes": len(out["mask"][0]),
}))
"""


@pytest.fixture(scope="module")
def registered(module_tmp, checkpoint: Path) -> dict:
    root = module_tmp("store")
    shards = root / "shards"
    shards.mkdir()
    write_summary(shards, fake_summary())
    uri = tracking.resolve_tracking_uri(default_dir=root)
    settings = tracking.start_run(load_config("tiny"), shards=str(shards), tracking_uri=uri, run_name="reg")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    example = (buffer.getvalue(), "the left square")
    env_before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    first = registry.log_and_register(settings, checkpoint, example, aliases=("demo",))
    # A registration that fails after MLflow created the version ('latest' is a reserved alias),
    # then its retry: both must land on version 1, not add versions.
    with pytest.raises(mlflow.exceptions.MlflowException, match="latest"):
        registry.log_and_register(settings, checkpoint, example, aliases=("latest",))
    retried = registry.log_and_register(settings, checkpoint, example, aliases=("retried",))
    later = root / "checkpoint_later"  # the same run's later checkpoint: other weights
    shutil.copytree(checkpoint, later)
    weights = torch.load(later / MODEL_FILE, weights_only=True)
    torch.save(
        {name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
        later / MODEL_FILE,
    )
    second = registry.log_and_register(settings, later, example)
    env_after = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    return {
        "uri": uri,
        "run_id": settings.run_id,
        "versions": (first, retried, second),
        "later": later,
        "image": image,
        "env_before": env_before,
        "env_after": env_after,
    }


def test_a_version_per_checkpoint_of_a_run_and_retries_add_none(registered, checkpoint):
    assert registered["versions"] == ("1", "1", "2")
    assert registered["env_after"] == registered["env_before"]  # the process's MLflow target is kept
    client = tracking.client_for(registered["uri"])
    versions = client.search_model_versions("name = 'magnet'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert all(v.run_id == registered["run_id"] for v in versions)
    assert str(client.get_model_version_by_alias("magnet", "demo").version) == "1"
    assert str(client.get_model_version_by_alias("magnet", "retried").version) == "1"
    tags = {str(v.version): v.tags[registry.CHECKPOINT_DIGEST_TAG] for v in versions}
    assert tags == {
        "1": registry.checkpoint_digest(checkpoint),
        "2": registry.checkpoint_digest(registered["later"]),
    }
    assert tags["1"] != tags["2"]


def test_model_carries_signature_example_and_raw_weights(registered, tmp_path):
    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    info = mlflow.models.get_model_info("models:/magnet/1")
    assert info.signature.inputs.input_names() == ["image", "text"]
    assert info.signature.outputs.input_names() == ["mask"]
    local = Path(mlflow.artifacts.download_artifacts("models:/magnet/1", dst_path=str(tmp_path)))
    weights = local / "artifacts" / registry.CHECKPOINT_ARTIFACT
    assert (weights / MODEL_FILE).is_file() and not (weights / TRAIN_STATE_FILE).exists()
    assert (local / "serving_input_example.json").is_file() or (local / "input_example.json").is_file()


@pytest.mark.parametrize("kind", ["alias", "version", "run id", "checkpoint"])
def test_load_model_by_any_reference(registered, checkpoint, kind):
    ref = {
        "alias": "models:/magnet@demo",
        "version": "models:/magnet/1",
        "run id": registered["run_id"],
        "checkpoint": str(checkpoint),
    }[kind]
    model, cfg = registry.load_model(ref, tracking_uri=registered["uri"])
    assert cfg.model.image_size == 64 and not model.training
    expected = registered["later"] if kind == "run id" else checkpoint  # a run id: its latest model
    saved = torch.load(expected / MODEL_FILE, weights_only=True)
    loaded = model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_pyfunc_returns_masks_at_the_image_size(registered, checkpoint, monkeypatch):
    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    # Loading puts the model's code/ first on sys.path: later modules must not import from there.
    monkeypatch.setattr(sys, "path", list(sys.path))
    pyfunc = mlflow.pyfunc.load_model("models:/magnet@demo")
    image = registered["image"]
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    out = pyfunc.predict(pd.DataFrame({"image": [buffer.getvalue()], "text": ["the left square"]}))
    mask = np.asarray(Image.open(io.BytesIO(out["mask"][0])))
    assert mask.shape == (image.height, image.width) and set(np.unique(mask)) <= {0, 255}
    model, cfg = registry.load_model(str(checkpoint))
    expected = predict(model, cfg.model, [Image.open(io.BytesIO(buffer.getvalue()))], ["the left square"])[0]
    np.testing.assert_array_equal(mask > 0, expected > 0)


def test_unknown_references_are_named(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        registry.resolve_model_uri("nope")
    with pytest.raises(FileNotFoundError, match=MODEL_FILE):
        registry.log_and_register(tracking.RunRef("", "", ""), tmp_path, (b"", "x"))


def test_predict_and_evaluate_commands(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from data_prep.synthetic_shards import ensure_synthetic_shards
    from pipelines.cli import app

    shards = ensure_synthetic_shards(tmp_path, images=10, image_size=64)
    image = next((tmp_path / "data").rglob("*.jpg"))
    runner = CliRunner()
    overlay, mask = tmp_path / "out" / "overlay.png", tmp_path / "out" / "mask.png"
    model = ["--model", str(checkpoint)]
    outputs = ["--out", str(overlay), "--mask-out", str(mask)]
    predicted = runner.invoke(
        app,
        ["predict", *model, "--image", str(image), "--text", "the blue circle", *outputs],
    )
    assert predicted.exit_code == 0, predicted.output
    assert Image.open(mask).size == Image.open(image).size
    assert Image.open(overlay).width == Image.open(image).width

    # evaluate runs as users run it, in its own process: its DataLoader workers fork, and a
    # pytest process that already ran Prefect CLI tests in-process is no clean parent for that.
    metrics = tmp_path / "metrics.json"
    splits = ["--split", "val", "--split", "testB"]
    command = [MAGNET, "evaluate", *model, "--shards", str(shards), *splits, "--protocol", "original"]
    evaluated = subprocess.run(
        [*command, "--out", str(metrics)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    report = json.loads(metrics.read_text())
    assert report["protocol"] == "original" and "original size" in report["description"]
    assert report["metrics"]["val/n"] > 0 and 0 <= report["metrics"]["testB/oIoU"] <= 100

    refused = runner.invoke(app, ["evaluate", "--model", "no-such-model", "--shards", str(shards)])
    assert refused.exit_code != 0 and "no-such-model" in refused.output


def test_register_command_versions_a_checkpoint_no_run_produced(checkpoint, synthetic_shards, tmp_path):
    """The path of imported published weights: a checkpoint directory -> a new version of `magnet`
    with an alias, in a finished run tagged with the dataset, loadable by alias."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    shards = synthetic_shards(num_images=12)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["register", "--checkpoint", str(checkpoint), "--shards", str(shards), "--tracking-uri", uri]
    result = CliRunner().invoke(app, [*args, "--alias", "imported"])
    assert result.exit_code == 0, result.output
    registered = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))

    client = tracking.client_for(uri)
    version = client.get_model_version_by_alias("magnet", "imported")
    assert str(version.version) == str(registered["version"]) and version.run_id == registered["run_id"]
    run = client.get_run(registered["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset.summary_sha256"] == tracking.dataset_tags(shards)["dataset.summary_sha256"]
    assert not run.inputs.dataset_inputs  # it trained on nothing
    assert "Not scored at registration." in version.description  # the model card
    model, cfg = registry.load_model("models:/magnet@imported", tracking_uri=uri)
    assert cfg.model.image_size == 64 and not model.training

    refused = CliRunner().invoke(app, ["register", "--checkpoint", str(tmp_path), "--shards", str(shards)])
    assert refused.exit_code != 0 and "config.yaml is missing" in refused.output


# --------------------------------------------- the registered model outside this checkout
@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python with this environment's packages but without the project: a venv whose one .pth
    names the environment's site-packages, whose own .pth files (the editable install's hook)
    are then never run. ``uvicorn`` in its bin runs on it, for `mlflow models serve`."""
    root = tmp_path_factory.mktemp("bare-python")
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    (site / "environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    uvicorn = root / "bin" / "uvicorn"
    uvicorn.write_text(f"#!{python}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return python


def _bare_env(python: Path, tracking_uri: str) -> dict[str, str]:
    """No PYTHONPATH, the bare Python's bin first on PATH, the registry at ``tracking_uri``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {
        **env,
        "PATH": os.pathsep.join([str(python.parent), "/usr/bin", "/bin"]),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_REGISTRY_URI": tracking_uri,
        "HF_HUB_OFFLINE": "1",
    }


def _image_file(registered: dict, directory: Path) -> Path:
    path = directory / "photo.jpg"
    registered["image"].save(path, format="JPEG")
    return path


def test_model_loads_from_its_own_artifacts_where_the_project_is_not_installed(
    registered, bare_python, tmp_path
):
    env = _bare_env(bare_python, registered["uri"])
    absent = subprocess.run([bare_python, "-c", "import magnet"], env=env, cwd=tmp_path, capture_output=True)
    assert absent.returncode != 0 and b"No module named 'magnet'" in absent.stderr

    image = _image_file(registered, tmp_path)
    loaded = subprocess.run(
        [bare_python, "-c", LOAD_AND_PREDICT, "models:/magnet@demo", str(image), EXPRESSION],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    for file in report["files"]:  # the project's packages came out of the model's code/ directory
        assert f"{os.sep}artifacts{os.sep}code{os.sep}" in file, file
    assert report["mask_bytes"] > 0
    required = set(registry.SERVING_REQUIREMENTS)
    unmet = {  # every import the project makes is satisfied by a requirement (mlflow: 3 owners)
        name: owners
        for name, owners in report["owners"].items()
        if not {owner.lower().replace("_", "-") for owner in owners} & required
    }
    assert not unmet, unmet

    pins = registry.serving_requirements()
    assert not [pin for pin in pins if "+" in pin or pin.startswith("magnet-pipeline")]
    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/magnet@demo"))
    assert requirements.read_text().split() == pins


@pytest.mark.timeout(420)
def test_mlflow_models_serve_answers_a_request_with_magnet_predicts_mask(registered, bare_python, tmp_path):
    """The README's request, sent to `mlflow models serve` running on the bare Python."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [bare_python, "-m", "mlflow", "models", "serve", "-m", "models:/magnet@demo",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=_bare_env(bare_python, registered["uri"]),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        image = _image_file(registered, tmp_path)
        expected = tmp_path / "mask.png"
        predicted = CliRunner().invoke(
            app,
            ["predict", "--model", "models:/magnet@demo", "--tracking-uri", registered["uri"],
             "--image", str(image), "--text", EXPRESSION, "--out", str(tmp_path / "overlay.png"),
             "--mask-out", str(expected)],
        )  # fmt: skip
        assert predicted.exit_code == 0, predicted.output

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        request = {"dataframe_split": {
            "columns": ["image", "text"],
            "data": [[base64.b64encode(image.read_bytes()).decode(), EXPRESSION]],
        }}  # fmt: skip
        post = urllib.request.Request(
            f"{base}/invocations",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(post, timeout=120) as response:
            (row,) = json.loads(response.read())["predictions"]
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["mask"]))))
        np.testing.assert_array_equal(served, np.asarray(Image.open(expected)))
        assert served.shape == (registered["image"].height, registered["image"].width)
    finally:
        _stop_group(server)
        log.close()


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process's session (the CLI and the uvicorn it started), SIGKILL after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue
