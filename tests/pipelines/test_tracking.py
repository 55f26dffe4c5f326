"""MLflow tracking: absolute URIs, the run's params/tags/config, and the rank-0 logger."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from contract_files import fake_summary, write_summary
from PIL import Image

from data_prep.contract import ShardError, read_summary
from magnet.config import load_config
from pipelines import tracking


@pytest.fixture
def shard_root(tmp_path: Path) -> Path:
    root = tmp_path / "shards" / "synthcoco-unc"
    root.mkdir(parents=True)
    counts = {
        "train": {"read": 12, "written": 12, "rejected": 0},
        "val": {"read": 5, "written": 4, "rejected": 1},
    }
    write_summary(root, fake_summary(dataset="synthcoco", counts=counts))
    return root


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tracking.resolve_tracking_uri(default_dir=tmp_path)


def test_tracking_uri_is_absolute_wherever_it_comes_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_tracking_uri("sqlite:///rel/x.db") == f"sqlite:///{tmp_path.resolve()}/rel/x.db"
    assert tracking.resolve_tracking_uri("mlruns") == (tmp_path / "mlruns").resolve().as_uri()
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/env.db"
    location = tracking.default_artifact_location(f"sqlite:///{tmp_path}/mlflow.db", "my exp")
    assert location == (tmp_path / "mlartifacts" / "my_exp").as_uri()
    for name, directory in (("..", "experiment"), ("../../up", "up"), (".hidden", "hidden")):
        location = tracking.default_artifact_location(f"sqlite:///{tmp_path}/mlflow.db", name)
        assert location == (tmp_path / "mlartifacts" / directory).as_uri()  # never outside mlartifacts


def test_run_records_config_dataset_and_git(store, shard_root, tmp_path):
    cfg = load_config("tiny", ["train.lr=0.001"])
    settings = tracking.start_run(cfg, shards=str(shard_root), tracking_uri=store, run_name="r1")
    assert settings.tracking_uri == store
    run = tracking.client_for(store).get_run(settings.run_id)
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.params["model.image_size"] == str(cfg.model.image_size)
    assert len(run.data.params) == len(cfg.flat())
    tags = run.data.tags
    assert tags["dataset.dataset"] == "synthcoco" and tags["dataset.count.val"] == "4"
    assert tags["dataset.rejected.val"] == "1" and "dataset.rejected.train" not in tags
    assert len(tags["dataset.summary_sha256"]) == 64
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert run.info.run_name == "r1"
    # artifacts land under the database's directory, not the process's working directory
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    artifacts = [a.path for a in tracking.client_for(store).list_artifacts(settings.run_id)]
    assert "config.yaml" in artifacts

    again = tracking.start_run(cfg, shards=str(shard_root), tracking_uri=store, run_name="r1", resume=True)
    assert again.run_id == settings.run_id
    fresh = tracking.start_run(cfg, shards=str(shard_root), tracking_uri=store, run_name="r1")
    assert fresh.run_id != settings.run_id


def test_resume_continues_the_run_that_trained_there(store, shard_root):
    """Of the runs of one name, a resume continues the one whose checkpoints it resumes: not a
    newer run of that name trained under other storage, nor one a refused start left (FAILED, no
    metrics, as `magnet train` left before it checked the name first)."""
    cfg = load_config("tiny")
    client = tracking.client_for(store)

    def run(path: str | None, metric: bool) -> str:
        settings = tracking.start_run(
            cfg, shards=str(shard_root), tracking_uri=store, run_name="r", run_path=path
        )
        if metric:
            tracking.MlflowRunLogger(settings).log_metrics({"train/loss": 1.0}, step=1)
        tracking.end_run(settings, status="FINISHED" if metric else "FAILED")
        return settings.run_id

    original = run("/ray/r", metric=True)
    run(None, metric=False)  # left by a refused start, untagged
    run("/elsewhere/r", metric=True)
    resumed = tracking.start_run(
        cfg, shards=str(shard_root), tracking_uri=store, run_name="r", resume=True, run_path="/ray/r"
    )
    assert resumed.run_id == original
    assert client.get_run(original).info.status == "RUNNING"


def test_logger_writes_metrics_and_pictures(store, shard_root):
    settings = tracking.start_run(
        load_config("tiny"), shards=str(shard_root), tracking_uri=store, run_name="r"
    )
    logger = tracking.MlflowRunLogger(settings)
    logger.log_metrics({"loss": 1.5, "lr": 1e-3}, step=1)
    logger.log_metrics({"loss": 0.5, "val/precision@0.5": 0.25}, step=2)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    logger.log_predictions(png.getvalue(), "val_step2", step=2)
    logger.log_predictions(png.getvalue(), "val_step3.png", step=3)

    client = tracking.client_for(store)
    history = client.get_metric_history(settings.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 0.5)]
    assert client.get_run(settings.run_id).data.metrics["val/precision_0.5"] == 0.25
    pictures = [a.path for a in client.list_artifacts(settings.run_id, "predictions")]
    assert pictures == ["predictions/val_step2.png", "predictions/val_step3.png"]


def test_evaluation_is_logged_with_its_protocol_mask_convention_and_table(store, shard_root):
    from magnet.evaluate import Evaluation

    counts = {split: c.model_dump() for split, c in read_summary(str(shard_root)).counts.items()}
    write_summary(shard_root, fake_summary(dataset="synthcoco", counts=counts, mask_mode="refer"))
    settings = tracking.start_run(
        load_config("tiny"), shards=str(shard_root), tracking_uri=store, run_name="e"
    )
    evaluation = Evaluation(
        protocol="lavt",
        eval_size=448,
        threshold=0.5,
        metrics={"val/oIoU": 60.0, "val/P@0.5": 70.0, "val/mIoU": 55.0, "val/pick_acc": 66.7,
                 "val/outline_IoU": 80.0, "val/n": 3,
                 "val/kind/relation/oIoU": 40.0, "val/kind/relation/mIoU": 35.0,
                 "val/kind/relation/pick_acc": 0.0, "val/kind/relation/n": 1},
        splits={},
        mask_mode="refer",
        breakdown="kind",
    )  # fmt: skip
    logger = tracking.MlflowRunLogger(settings)
    logger.log_evaluation(evaluation, step=7)

    client = tracking.client_for(store)
    run = client.get_run(settings.run_id)
    assert run.data.tags["dataset.mask_mode"] == "refer"
    assert run.data.tags["eval.protocol"] == "lavt" and run.data.tags["eval.mask_mode"] == "refer"
    assert run.data.tags["eval.breakdown"] == "kind"
    assert (
        "448x448" in run.data.tags["eval.description"] and "masks refer" in run.data.tags["eval.description"]
    )
    assert run.data.metrics["val/kind/relation/oIoU"] == 40.0 and run.data.metrics["val/P_0.5"] == 70.0
    table = json.loads(
        Path(client.download_artifacts(settings.run_id, "evaluation/step00000007.json")).read_text()
    )
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert rows[0] == {
        "split": "val", "group": "all", "oIoU": 60.0, "mIoU": 55.0, "pick_acc": 66.7, "outline_IoU": 80.0,
        "n": 3,
    }  # fmt: skip
    assert rows[1:] == [  # nothing picked right: no outline IoU
        {"split": "val", "group": "kind/relation", "oIoU": 40.0, "mIoU": 35.0, "pick_acc": 0.0,
         "outline_IoU": None, "n": 1}
    ]  # fmt: skip


def test_missing_summary_is_a_clear_error(store, tmp_path):
    with pytest.raises(ShardError, match=r"summary\.json is missing"):
        tracking.start_run(load_config("tiny"), shards=str(tmp_path), tracking_uri=store, run_name="x")
