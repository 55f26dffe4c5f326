"""The evaluate-magnet flow through Prefect's test harness: a tiny checkpoint scored on every
held-out split of tiny shards, in an MLflow run of its own."""

from __future__ import annotations

from pathlib import Path

from test_promote import checkpoint

from data_prep.contract import read_summary
from pipelines import tracking


def test_flow_scores_held_out_splits_in_its_own_run(prefect_harness, synthetic_shards, tmp_path: Path):
    from pipelines.flows.evaluate import evaluate_magnet

    shards = synthetic_shards(num_images=12, image_size=64, seed=0, samples_per_shard=8)
    model = checkpoint(tmp_path / "checkpoint", threshold=0.3)
    result = evaluate_magnet(
        model=str(model),
        shards=str(shards),
        experiment="evaluate-test",
        run_name="evaluate-test",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        pictures_dir=str(tmp_path / "pictures"),
    )
    splits = [s for s in read_summary(str(shards)).counts if s != "train"]
    assert splits and all(result["metrics"][f"{split}/n"] > 0 for split in splits)
    assert "train/n" not in result["metrics"]
    assert "protocol lavt" in result["protocol"]

    client = tracking.client_for(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "evaluate-test"
    assert run.data.tags["evaluation.model"] == str(model)
    assert run.data.tags["dataset.summary_sha256"]
    assert {tracking.metric_key(f"{split}/oIoU") for split in splits} <= set(run.data.metrics)
    logged = {entry.path for entry in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/step00000000.json" in logged
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == sorted(
        f"predictions-{split}.png" for split in splits
    )
    inputs = {d.dataset.name.rsplit("/", 1)[1] for d in run.inputs.dataset_inputs}
    assert inputs == set(splits)
