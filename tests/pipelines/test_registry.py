"""The registry: a checkpoint logged as a pyfunc with its raw weights, registered as versions of
`magnet`, and loaded back through every kind of reference."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from magnet.checkpoint import MODEL_FILE, TRAIN_STATE_FILE, TrainState, save_checkpoint
from magnet.config import load_config
from magnet.inference import predict
from magnet.models import build_model
from pipelines import registry, tracking

MAGNET = str(Path(sys.executable).with_name("magnet"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config("tiny", ["model.image_size=64", "model.text.pretrained=false"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint_step00000003"
    return save_checkpoint(
        directory,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=TrainState(step=3),
        cfg=cfg,
        rng_states=[{}],
    )


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict:
    root = tmp_path_factory.mktemp("store")
    shards = root / "shards"
    shards.mkdir()
    (shards / "summary.json").write_text(json.dumps({"dataset": "refcoco", "splitBy": "unc", "counts": {}}))
    uri = tracking.resolve_tracking_uri(default_dir=root)
    settings = tracking.start_run(load_config("tiny"), shards=shards, tracking_uri=uri, run_name="reg")
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
        "run_id": settings["run_id"],
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


def test_pyfunc_returns_masks_at_the_image_size(registered, checkpoint):
    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
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
        registry.log_and_register({"tracking_uri": "", "run_id": ""}, tmp_path, (b"", "x"))


def test_predict_and_evaluate_commands(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.demo import ensure_synthetic_shards

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
