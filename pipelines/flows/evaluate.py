"""The `evaluate-magnet` Prefect flow: score a checkpoint or a registered model on the held-out
splits of prepared shards, in an MLflow run of its own (the splits as evaluation inputs, the
metrics, the per-expression table, the worst cases and a picture per split).

The flow only puts tasks in order; the work lives in pipelines.evaluation and pipelines.tracking.
It is an entry point (a deployment starts it without `magnet evaluate`): it makes the shards and the
store absolute once and hands them on; the run travels as a `RunRef` and leaves in the result as
plain ``tracking_uri`` and ``run_id``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from data_prep.paths import absolute_location
from magnet.data import held_out_splits, open_split
from pipelines import interrupts, mlflow_record
from pipelines import tracking as mlflow_tracking
from pipelines.evaluation import evaluate_model
from pipelines.flows import artifact_key
from pipelines.registry import check_model_reference
from pipelines.tracking import RunRef

DEFAULT_EXPERIMENT = "magnet-evaluations"


@task(name="open-evaluation-run")
def open_evaluation_run(
    model: str, shards: str, tracking_uri: str, experiment: str, run_name: str | None
) -> RunRef:
    """A new MLflow run tagged with the model reference and the shards' dataset tags."""
    client = mlflow_tracking.client_for(tracking_uri)
    experiment_id = mlflow_tracking.get_or_create_experiment(client, experiment, tracking_uri)
    tags = {**mlflow_tracking.dataset_tags(shards), "evaluation.model": model}
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    get_run_logger().info("MLflow run %s at %s", run_id, tracking_uri)
    return RunRef(tracking_uri, experiment_id, run_id)


@task(name="evaluate")
def evaluate(
    model: str, shards: str, splits: list[str], tracking: RunRef, pictures_dir: Path | None
) -> dict[str, Any]:
    result = evaluate_model(
        model,
        shards,
        splits,
        tracking_uri=tracking.tracking_uri,
        log_to=tracking,
        pictures_dir=pictures_dir,
    )
    return {"protocol": result.describe(), "metrics": result.metrics}


@flow(name="evaluate-magnet", log_prints=True)
def evaluate_magnet(
    model: str,
    shards: str,
    splits: list[str] | None = None,
    train_split: str = "train",
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    pictures_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluate a trained MagNet on whole held-out splits, tracked in MLflow.

    Args:
        model: checkpoint directory (or its URL), or a registry reference: models:/magnet@alias,
            models:/magnet/N, runs:/<id>/model, a run id.
        shards: prepared dataset root ``<out>/<dataset>-<splitBy>`` (path or URL).
        splits: splits scored; None = every split but ``train_split``.
        train_split: the split left out when ``splits`` is None.
        experiment: MLflow experiment of the evaluation run.
        run_name: MLflow run name; None = MLflow's.
        tracking_uri: MLflow tracking URI (also where a models:/ or runs:/ model is read);
            None = MLFLOW_TRACKING_URI or ./mlflow.db.
        pictures_dir: also write the prediction pictures there.
    """
    interrupts.reclaim_sigterm()
    shard_root = absolute_location(shards)
    store = mlflow_tracking.resolve_tracking_uri(tracking_uri)
    check_model_reference(model, tracking_uri)
    splits = splits or held_out_splits(shard_root, train_split)
    for split in splits:  # a missing split or corrupt shard refused before the run is opened
        open_split(shard_root, split)
    tracking = open_evaluation_run(model, shard_root, store, experiment, run_name)
    mlflow_record.link_flow_run(tracking, key=artifact_key("mlflow-run", tracking.run_id))
    try:
        evaluation = evaluate(
            model, shard_root, splits, tracking, Path(pictures_dir).resolve() if pictures_dir else None
        )
    except BaseException:
        mlflow_tracking.end_run(tracking, status="FAILED")
        raise
    mlflow_tracking.end_run(tracking)
    print(f"{model}: {evaluation['protocol']}; MLflow: {mlflow_tracking.run_url(tracking)}")
    return {"tracking_uri": tracking.tracking_uri, "run_id": tracking.run_id, **evaluation}
