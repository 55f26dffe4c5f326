"""The train-magnet flow through Prefect's test harness: tiny shards, one Ray worker, a few steps.
Checks what a user finds afterwards: the MLflow run (params, tags, curves, pictures, the model),
the registered version, the markdown report and the pictures on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_runs import TINY_RUN

from pipelines import tracking

pytestmark = pytest.mark.slow

OVERRIDES = [*TINY_RUN, "eval.eval_size=64", "train.max_steps=3", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def flow_run(module_tmp) -> dict:
    from prefect.artifacts import Artifact
    from prefect.testing.utilities import prefect_test_harness

    from data_prep.synthetic_shards import ensure_synthetic_shards
    from pipelines.flows.train import train_magnet

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = (
        "1"  # Ray's workers inherit it: samples in seconds
    )
    root = module_tmp("flow")
    shards = ensure_synthetic_shards(root, images=20, image_size=64)
    with prefect_test_harness():
        result = train_magnet(
            config="tiny",
            shards=str(shards),
            overrides=OVERRIDES,
            num_workers=1,
            experiment="flow-test",
            tracking_uri=f"sqlite:///{root}/mlflow.db",
            storage_path=str(root / "ray"),
            aliases=["candidate"],
            pictures_dir=str(root / "pictures"),
        )
        key = f"train-magnet-{result['run_name']}".lower()
        artifact = Artifact.get(key)
        link = Artifact.get(f"mlflow-run-{result['run_name']}".lower())
    os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    return {
        "result": result,
        "root": root,
        "markdown": artifact.data if artifact else None,
        "link": link.data if link else None,
    }


def test_flow_returns_metrics_of_every_held_out_split(flow_run):
    result = flow_run["result"]
    for split in ("val", "testA", "testB"):
        assert 0 <= result["metrics"][f"{split}/oIoU"] <= 100
        assert result["metrics"][f"{split}/n"] > 0
    assert "protocol lavt" in result["protocol"]
    assert Path(result["checkpoint"], "model.pt").is_file()


def test_mlflow_run_has_params_tags_curves_and_pictures(flow_run):
    result = flow_run["result"]
    client = tracking.client_for(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == result["run_name"]
    assert run.data.params["train.max_steps"] == "3" and run.data.params["model.image_size"] == "64"
    assert run.data.tags["dataset.dataset"] == "refcoco" and "mlflow.source.git.commit" in run.data.tags
    assert [m.step for m in client.get_metric_history(result["run_id"], "train/loss")] == [1, 2, 3]
    assert "testB/oIoU" in run.data.metrics and "val/P_0.5" in run.data.metrics
    # how the figures were scored, the breakdown by kind of expression and its table
    assert run.data.tags["dataset.mask_mode"] == run.data.tags["eval.mask_mode"] == "union"
    assert run.data.tags["eval.protocol"] == "lavt" and run.data.tags["eval.breakdown"] == "kind"
    assert any(key.startswith("testB/kind/") for key in run.data.metrics)
    assert sorted(a.path for a in client.list_artifacts(result["run_id"], "evaluation")) == [
        "evaluation/expressions_step00000003.json",  # one row per expression
        "evaluation/step00000003.json",  # split x group
    ]
    pictures = {a.path for a in client.list_artifacts(result["run_id"], "predictions")}
    assert {f"predictions/final_{s}_step00000003.png" for s in ("val", "testA", "testB")} <= pictures
    assert "predictions/predictions_val_step00000003.png" in pictures  # drawn during training
    assert "config.yaml" in {a.path for a in client.list_artifacts(result["run_id"])}
    assert sorted(p.name for p in (flow_run["root"] / "pictures").glob("*.png")) == [
        "predictions-testA.png",
        "predictions-testB.png",
        "predictions-val.png",
    ]


def test_model_is_registered_and_loadable(flow_run):
    from pipelines.registry import load_model

    result = flow_run["result"]
    client = tracking.client_for(result["tracking_uri"])
    version = client.get_model_version_by_alias("magnet", "candidate")
    assert str(version.version) == result["model_version"] and version.run_id == result["run_id"]
    model, cfg = load_model("models:/magnet@candidate", tracking_uri=result["tracking_uri"])
    assert cfg.train.max_steps == 3 and not model.training


def test_markdown_report_names_metrics_and_run(flow_run):
    markdown = flow_run["markdown"]
    assert markdown is not None
    assert "| testA |" in markdown and flow_run["result"]["run_id"] in markdown
    assert f"models:/magnet/{flow_run['result']['model_version']}" in markdown


def test_run_shows_data_system_metrics_table_card_and_link(flow_run):
    """Issue 16.3: what the UI shows of the run and of its registered version."""
    result = flow_run["result"]
    client = tracking.client_for(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    contexts = {
        i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
        for i in run.inputs.dataset_inputs
    }
    assert contexts == {
        "refcoco-unc/train": "training",
        **{f"refcoco-unc/{s}": "evaluation" for s in ("val", "testA", "testB")},
    }
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0  # from rank 0's worker
    table = f"evaluation/expressions_step{3:08d}.json"
    assert table in {a.path for a in client.list_artifacts(result["run_id"], "evaluation")}
    pictures = {a.path for a in client.list_artifacts(result["run_id"], "predictions")}
    assert {f"predictions/worst_{s}_step00000003.png" for s in ("val", "testA", "testB")} <= pictures
    card = client.get_model_version("magnet", result["model_version"]).description
    assert "trained here" in card and run.data.tags["dataset.summary_sha256"] in card
    assert "| testB |" in card and "1 Ray Train worker(s) on CPU" in card
    assert flow_run["link"] is not None and result["run_id"] in flow_run["link"]
