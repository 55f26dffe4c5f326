"""What a run shows in MLflow, asserted on a real SQLite store: dataset inputs, system metrics, the
per-expression evaluation table and worst cases, the model card on a registered version, the link
to the run. The flow wires these in (tests/pipelines/test_train_flow.py checks the whole)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from contract_files import fake_summary, write_summary
from torch import nn

from data_prep.contract import MANIFEST, SUMMARY, read_summary
from magnet.checkpoint import CheckpointMeta, ImportRecord
from magnet.config import load_config
from magnet.evaluate import evaluate
from magnet.models import MagNetOutput
from pipelines import mlflow_record, tracking

STEP = 3


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> str:
    return str(synthetic_shards(num_images=24, image_size=48, seed=2, samples_per_shard=6))


@pytest.fixture
def run(tmp_path: Path, shards: str, monkeypatch: pytest.MonkeyPatch) -> tracking.RunRef:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri(default_dir=tmp_path)
    return tracking.start_run(load_config("tiny"), shards=shards, tracking_uri=uri, run_name="record")


class Everywhere(nn.Module):
    """Predicts the whole image: each expression's IoU is its object's share of the image."""

    def forward(self, image, input_ids, attention_mask, target_mask=None) -> MagNetOutput:
        size = image.shape[-1] // 4
        return MagNetOutput(mask_logits=torch.full((image.shape[0], 1, size, size), 5.0), aux_mask_logits=[])


def tiny_eval_config():
    return load_config("tiny", ["model.image_size=32", "data.batch_size=4", "data.loader_workers=0"])


def test_training_and_evaluation_splits_are_dataset_inputs(run, shards):
    digest = hashlib.sha256(Path(shards, SUMMARY).read_bytes()).hexdigest()
    tracking.log_dataset_inputs(run, shards, ["val", "testA"], "evaluation")
    tracking.log_dataset_inputs(run, shards, ["val"], "evaluation")  # a retry adds nothing
    inputs = run.client.get_run(run.run_id).inputs.dataset_inputs
    seen = {i.dataset.name: (i.dataset, {t.key: t.value for t in i.tags}) for i in inputs}
    assert sorted(seen) == ["refcoco-unc/testA", "refcoco-unc/train", "refcoco-unc/val"]
    for name, (dataset, tags) in seen.items():
        split = name.split("/")[1]
        assert tags[tracking.CONTEXT_TAG] == ("training" if split == "train" else "evaluation")
        assert dataset.digest == digest[: tracking.DIGEST_LENGTH]
        assert json.loads(dataset.source)["uri"] == f"{shards}/{split}"
        assert json.loads(dataset.profile)["summary_sha256"] == digest


def test_system_metrics_are_logged_into_the_run(run):
    with mlflow_record.system_metrics(run, interval_s=0.2):
        time.sleep(1.5)
    metrics = run.client.get_run(run.run_id).data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0
    assert metrics["system/system_memory_usage_megabytes"] > 0
    if torch.cuda.is_available():
        assert "system/gpu_0_memory_usage_megabytes" in metrics
        assert "system/gpu_0_utilization_percentage" in metrics


def test_evaluation_table_has_a_row_per_expression_and_worst_cases_a_picture(run, shards, tmp_path):
    evaluation = evaluate(
        Everywhere(), shards, tiny_eval_config(), splits=["val", "testB"], keep_rows=True, keep_worst=2
    )
    artifact = mlflow_record.log_evaluation(run, evaluation, shards, STEP)
    mlflow_record.log_evaluation(run, evaluation, shards, STEP)  # a retried task appends nothing
    client = run.client
    local = client.download_artifacts(run.run_id, artifact, str(tmp_path))
    table = json.loads(Path(local).read_text())
    assert table["columns"] == list(mlflow_record.TABLE_COLUMNS)
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert len(rows) == evaluation.metrics["val/n"] + evaluation.metrics["testB/n"]
    manifest = {r["sent_id"]: r for r in pq.read_table(f"{shards}/{MANIFEST}").to_pylist()}
    for row in rows:
        assert (manifest[row["sent_id"]]["raw"], manifest[row["sent_id"]]["split"]) == (
            row["raw"],
            row["split"],
        )
        assert row["iou"] == pytest.approx(row["area"])  # predicting everywhere, at the eval size
    assert {row["picked"] for row in rows} == {True, False}  # everywhere picks each image's largest
    listed = json.loads(client.get_run(run.run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": artifact, "type": "table"} in listed  # what the UI's evaluation view lists
    pictures = {a.path for a in client.list_artifacts(run.run_id, "predictions")}
    assert {f"predictions/worst_{s}_step{STEP:08d}.png" for s in ("val", "testB")} <= pictures


def test_kind_comes_from_the_manifest_where_known(tmp_path):
    pq.write_table(pa.table({"sent_id": [1, 2], "kind": ["relation", None]}), tmp_path / MANIFEST)
    assert mlflow_record._kinds(str(tmp_path)) == {1: "relation"}
    pq.write_table(pa.table({"sent_id": [1, 2]}), tmp_path / MANIFEST)
    assert mlflow_record._kinds(str(tmp_path)) == {}


def fake_benchmark(root: Path, val_refs: int) -> str:
    """summary.json and manifest.parquet of a RefCOCO-named set whose val has ``val_refs`` refs."""
    root.mkdir(parents=True)
    write_summary(root, fake_summary(mask_mode="refer"))
    pq.write_table(pa.table({"split": ["val"] * val_refs, "ref_id": list(range(val_refs))}), root / MANIFEST)
    return str(root)


def test_published_scores_only_beside_the_benchmarks_own_splits(tmp_path):
    real = fake_benchmark(tmp_path / "real", 3811)
    small = fake_benchmark(tmp_path / "small", 40)
    assert mlflow_record._benchmark_splits(real, read_summary(real)) == {"val": 75.24}
    assert mlflow_record._benchmark_splits(small, read_summary(small)) == {}


def checkpoint_dir(root: Path, meta: CheckpointMeta) -> Path:
    root.mkdir(parents=True)
    cfg = load_config("tiny", ["train.seed=7"])
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    meta.write(root)
    return root


def test_model_card_is_the_registered_versions_description(run, shards, tmp_path):
    client = run.client
    client.create_registered_model("magnet")
    version = client.create_model_version("magnet", "file:///nowhere", run_id=run.run_id).version
    evaluation = {"protocol": "protocol lavt: IoU at 32x32", "metrics": {"val/oIoU": 41.5, "val/n": 12.0}}
    trained = checkpoint_dir(tmp_path / "trained", CheckpointMeta(step=STEP, epoch=0, world_size=1))
    card = mlflow_record.model_card(run, trained, shards, evaluation, "1 Ray Train worker(s) on CPU")
    mlflow_record.describe_version(run.tracking_uri, version, card)
    shown = client.get_model_version("magnet", version).description
    assert shown == card
    digest = hashlib.sha256(Path(shards, SUMMARY).read_bytes()).hexdigest()
    for part in (
        f"trained here ({STEP} steps); config `tiny`, MLflow run `record`",
        digest,
        "trained on `train`",
        "**Scored** on `val`: protocol lavt: IoU at 32x32; masks prepared as `union`",
        "| val | 12 | 41.50 |",
        "No published comparison",
        "train.seed=7",
        "1 Ray Train worker(s) on CPU",
        "**Code**: commit",
    ):
        assert part in card, part
    source = ImportRecord(file="/w.pth", sha256="ab", tensors_mapped=1, dropped={}, training_only_kept=())
    imported = checkpoint_dir(
        tmp_path / "imported", CheckpointMeta(step=0, epoch=0, world_size=1, imported_from=source)
    )
    card = mlflow_record.model_card(run, imported, shards, None, "none")
    assert "imported from the published checkpoint /w.pth (sha256 ab)" in card and "not trained on" in card
    assert "Not scored at registration." in card and "| split |" not in card


def test_run_link_points_at_the_runs_page(run):
    experiment = run.client.get_run(run.run_id).info.experiment_id
    page = f"/#/experiments/{experiment}/runs/{run.run_id}"
    assert mlflow_record.run_link(run) == f"http://127.0.0.1:5000{page}"
