"""One Tune trial: a Ray Train run of the trial's config (the same per-worker loop as `magnet
train`), tracked as an MLflow child run of the sweep's parent run.

Tune calls ``run_trial`` with the trial's sampled values and the sweep's `TrialSettings`; a
``TuneReportCallback`` forwards every evaluated report to Tune, so ASHA stops bad trials on the
validation oIoU. A restored sweep reruns the function: the trial's MLflow run and its Train run
(from its latest checkpoint) are continued, not started again; a trial that had finished after
Tune's last snapshot of the sweep hands Tune its evaluated reports again and is not reopened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from magnet.config import Config
from magnet.train import NOT_EVALUATED, SCORE_KEY
from pipelines.sweep.space import apply_params
from pipelines.tracking import RunRef

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "tune.trial_id"
SWEEP_TAG = "tune.sweep"
PARAMS_TAG = "tune.params"


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep runs with, as `run_sweep` hands it to `run_trial` (pickled by
    Tune's ``with_parameters``): the resolved base config and absolute locations.

    Args:
        config: the trials' base config, the sweep file's overrides applied.
        variants: the sweep file's named bundles of config values (`apply_params`).
        shards: prepared dataset root, absolute path or URL.
        parent: the sweep's parent run; each trial's run is its child, in the same store.
        experiment: the MLflow experiment of the parent and the trials' runs.
        sweep_name: the sweep's name, tagged on each trial's run.
        train_storage: absolute storage of the trials' Train runs (``<sweep path>/train``).
        num_workers: Ray Train workers per trial.
        use_gpu: one GPU per worker.
        cpus_per_worker: CPUs reserved per worker.
        max_failures: worker-group restarts within a trial.
    """

    config: Config
    variants: dict[str, dict[str, Any]]
    shards: str
    parent: RunRef
    experiment: str
    sweep_name: str
    train_storage: str
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    max_failures: int


def evaluated(metrics: dict[str, Any]) -> bool:
    """Whether a report carries an evaluation: checkpoint-only reports lack the metric ASHA and the
    searcher need (Tune refuses such results)."""
    return metrics.get(SCORE_KEY, NOT_EVALUATED) > NOT_EVALUATED


def evaluated_reports_callback() -> Any:
    """Tune's TuneReportCallback, passing on only the `evaluated` reports."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvaluatedReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and evaluated(metrics[0]):
                super().after_report(run_context, metrics, checkpoint)

    return EvaluatedReports()


def run_trial(params: dict[str, Any], sweep: TrialSettings) -> None:
    """One trial: a Ray Train run of the trial's config, tracked as a child of the sweep's run."""
    import ray.tune

    from pipelines import tracking
    from pipelines.mlflow_record import tag_checkpoints
    from pipelines.train_driver import checkpoint_reports, run_training

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_params(sweep.config, params, sweep.variants)
    run_name = f"trial-{trial_id}"
    done = tracking.find_run(sweep.parent.tracking_uri, sweep.experiment, run_name)
    if done is not None and done.info.status == "FINISHED":
        # the sweep's driver died after this trial ended but before Tune's snapshot recorded it
        for metrics in filter(evaluated, checkpoint_reports(sweep.train_storage, run_name)):
            ray.tune.report(metrics)
        return
    child = tracking.start_run(
        cfg,
        shards=sweep.shards,
        tracking_uri=sweep.parent.tracking_uri,
        experiment=sweep.experiment,
        run_name=run_name,
        resume=True,  # a restored sweep reopens the trial's run; a new trial gets a new one
        extra_tags={
            PARENT_TAG: sweep.parent.run_id,
            SWEEP_TAG: sweep.sweep_name,
            TRIAL_TAG: trial_id,
            PARAMS_TAG: json.dumps(params, sort_keys=True),
        },
    )
    train_args = dict(
        num_workers=sweep.num_workers,
        use_gpu=sweep.use_gpu,
        cpus_per_worker=sweep.cpus_per_worker,
        storage_path=sweep.train_storage,
        run_name=run_name,
        tracking=child,
        max_failures=sweep.max_failures,
        callbacks=[evaluated_reports_callback()],
    )
    try:
        result = run_training(cfg, sweep.shards, **train_args)
    except FileExistsError:  # the sweep was restored: continue this trial's Train run
        result = run_training(cfg, sweep.shards, resume=True, **train_args)
    tag_checkpoints(child, result.best_checkpoint, result.last_checkpoint)
    tracking.end_run(child)
