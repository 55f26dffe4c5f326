"""The `tune-magnet` and `promote-magnet` Prefect flows.

tune-magnet runs a sweep (pipelines.sweep: Ray Tune trials of Ray Train runs, an MLflow parent run
with a child per trial, the best model registered) and leaves the ranked trials as a Prefect table
artifact; promote-magnet compares the best finished run's model with the `champion` and moves the
alias when it wins (pipelines.promote). The flows only put the work in order. Each is an entry
point (a deployment starts it without `magnet tune` or `magnet promote`): it makes the shards,
the storage and tune-magnet's tracking store absolute once and hands them on.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from data_prep.paths import absolute_location
from data_prep.synthetic_shards import ensure_synthetic_shards
from pipelines import interrupts
from pipelines.defaults import PROMOTE, TUNE, absolute_storage
from pipelines.flows import artifact_key
from pipelines.tracking import resolve_tracking_uri


@task(name="sweep")
def sweep(
    config: str,
    space: str,
    shards: str,
    overrides: list[str],
    storage_path: str,
    options: dict[str, Any],
) -> Any:
    from magnet.config import load_config
    from pipelines.sweep.driver import run_sweep
    from pipelines.sweep.space import load_space

    cfg = load_config(config, overrides)
    return run_sweep(cfg, load_space(space, cfg), shards, storage_path=storage_path, **options)


@flow(name="tune-magnet", log_prints=True)
def tune_magnet(
    space: str = TUNE.space,
    config: str = TUNE.config,
    shards: str | None = None,
    overrides: list[str] | None = None,
    trials: int | None = None,
    search: str | None = None,
    workers_per_trial: int = TUNE.workers_per_trial,
    gpus_per_trial: int = TUNE.gpus_per_trial,
    max_concurrent: int | None = None,
    experiment: str = TUNE.experiment,
    resume: str | None = None,
    tracking_uri: str | None = None,
    storage_path: str | None = None,
    ray_address: str | None = None,
    max_failures: int = TUNE.max_failures,
    register_best: bool = TUNE.register_best,
    sweep_name: str | None = None,
) -> dict[str, Any]:
    """Sweep MagNet's loss weights (or run the ablation) with Ray Tune over Ray Train.

    Args:
        space: sweep file (configs/sweeps/*.yaml).
        config: preset name or YAML path every trial starts from.
        shards: prepared dataset root; None = the synthetic demo data under ./demo-run.
        overrides: dotted config overrides applied before the trial's values.
        trials: number of samples (times the grid); None = the space's num_samples.
        search: optuna, random or grid; None = the space's.
        workers_per_trial: Ray Train workers per trial.
        gpus_per_trial: GPUs per trial (one per worker; equal to workers_per_trial).
        max_concurrent: trials at once at most (never more than the cluster holds).
        experiment: MLflow experiment of the sweep's runs.
        resume: name of a stopped sweep to continue.
        tracking_uri: MLflow; None = MLFLOW_TRACKING_URI or ./mlflow.db.
        storage_path: Ray storage (local path or URL); default ./ray-results.
        ray_address: Ray cluster; None = RAY_ADDRESS or a local Ray.
        max_failures: worker-group restarts within a trial, each from its last checkpoint.
        register_best: register the best trial's model as a version of `magnet`.
        sweep_name: the new sweep's name; None = a unique one (``resume`` names a resumed one).
    """
    interrupts.reclaim_sigterm()
    if shards is None:
        shard_root = str(ensure_synthetic_shards(Path("demo-run").resolve()))
    else:
        shard_root = absolute_location(shards)
    result = sweep(
        config,
        str(Path(space).resolve()),
        shard_root,
        overrides or [],
        absolute_storage(storage_path),
        {
            "tracking_uri": resolve_tracking_uri(tracking_uri),
            "experiment": experiment,
            "sweep_name": resume or sweep_name,
            "resume": resume is not None,
            "num_samples": trials,
            "search": search,
            "workers_per_trial": workers_per_trial,
            "gpus_per_trial": gpus_per_trial,
            "max_concurrent": max_concurrent,
            "ray_address": ray_address,
            "max_failures": max_failures,
            "register_best": register_best,
        },
    )
    columns = result.columns
    create_table_artifact(
        [{c: row.get(c) for c in columns} for row in result.trials],
        key=artifact_key("tune-magnet", result.sweep_name),
        description=f"Trials of {result.sweep_name} ranked by {result.metric}",
    )
    lines = [f"# tune-magnet: {result.sweep_name}", "", result.table_markdown]
    if result.report_markdown:
        lines += ["", "## Per variant (mean and std over seeds)", "", result.report_markdown]
    if result.model_version:
        lines += [
            "",
            f"Best trial's model: `models:/magnet/{result.model_version}` (run {result.best_run_id})",
        ]
    report = "\n".join(lines)
    create_markdown_artifact(report, key=artifact_key("tune-magnet-report", result.sweep_name))
    print(report)
    return {
        "sweep_name": result.sweep_name,
        "parent_run_id": result.parent_run_id,
        "tracking_uri": result.tracking_uri,
        "experiment_path": result.experiment_path,
        "best_run_id": result.best_run_id,
        "model_version": result.model_version,
        "metric": result.metric,
        "trials": result.trials,
        "early_stopped": sum(bool(r["early_stopped"]) for r in result.trials),
    }


@task(name="promote")
def promote_task(options: dict[str, Any]) -> Any:
    from pipelines.promote import promote

    return promote(**options)


@flow(name="promote-magnet", log_prints=True)
def promote_magnet(
    experiment: str,
    shards: str,
    metric: str = PROMOTE.metric,
    sweep: str | None = None,
    min_gain: float = PROMOTE.min_gain,
    split: str | None = None,
    protocol: str = PROMOTE.protocol,
    tracking_uri: str | None = None,
    device: str = PROMOTE.device,
) -> dict[str, Any]:
    """Promote the best finished run's model to `champion` when it beats the current one.

    Args:
        experiment: MLflow experiment whose finished runs compete.
        shards: prepared dataset root both models are scored on.
        metric: picks the challenger and names the compared score (val_oIoU).
        sweep: only the children of this sweep's parent run id compete.
        min_gain: required margin in metric points.
        split: split scored; None = the metric's split.
        protocol: lavt or original.
        tracking_uri: MLflow; None = MLFLOW_TRACKING_URI or ./mlflow.db.
        device: where evaluation runs.
    """
    interrupts.reclaim_sigterm()
    result = promote_task(
        {
            "shards": absolute_location(shards),
            "experiment": experiment,
            "metric": metric,
            "sweep_run_id": sweep,
            "min_gain": min_gain,
            "split": split,
            "protocol": protocol,
            "tracking_uri": tracking_uri,
            "device": device,
        }
    )
    get_run_logger().info(result.summary)
    create_markdown_artifact(
        f"# promote-magnet: {result.decision}\n\n{result.summary}\n\n"
        f"`champion` = version {result.champion_version}",
        key=artifact_key("promote-magnet", experiment),
    )
    return asdict(result)
