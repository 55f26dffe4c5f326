"""The Ray Tune driver: sweeps of MagNet's loss weights (and the paper's ablations) where every
trial is a full Ray Train run, tracked as MLflow child runs of one parent run per sweep.

    space = load_space("configs/sweeps/loss-weights.yaml")
    run_sweep(load_config("tiny"), space, shards, storage_path=..., tracking_uri=...) -> SweepResult

Its caller resolves the locations (absolute shards, storage and tracking URI) and the config;
`run_trial` gets them, with the parent run, as one `TrialSettings`.

Tune-over-Train (Ray 2.60, Train V2): each trial runs ``pipelines.sweep.trial.run_trial`` with its
own ScalingConfig. The trial driver only waits on its Train controller (a 0-CPU actor), as
``magnet train``'s own process does, so Tune reserves memory for it and no CPU (a reserved CPU
would leave a 2-core machine unable to run a 2-worker trial), on the head node, where the trial's
Train controller then lives too: a lost worker node costs only the trials whose workers it held
(each restarts them from its last checkpoint, ``max_failures``); Train reserves the workers itself
when the trial starts, so the number of trials running at once is bounded here by the workers the
cluster holds (``trial_concurrency``), or lower with ``max_concurrent``. A sweep whose driver died
continues with ``resume=True`` and its name (``Tuner.restore``); a trial that was cut off resumes
its Train run from its latest checkpoint. At the end the trials' runs are closed and ranked, an
ablation's finished trials scored on ``report.splits`` and aggregated, the best model registered.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from data_prep.paths import check_name
from magnet import progress
from magnet.checkpoint import local_checkpoint
from magnet.config import Config
from magnet.data import first_example, held_out_splits
from pipelines import interrupts
from pipelines.defaults import TUNE
from pipelines.evaluation import evaluate_model
from pipelines.sweep.report import (
    COMMAND_PARAM,
    METRICS,
    OVERRIDES_PARAM,
    REPORT_PARAM,
    RESUME_TAG,
    SWEEP_KIND_TAG,
    TABLE_METRICS,
    aggregate,
    aggregate_groups,
    aggregate_plot,
    csv_table,
    markdown_table,
    trial_columns,
)
from pipelines.sweep.space import (
    VARIANT_KEY,
    SpaceError,
    SweepSpace,
    apply_params,
    check_against,
    check_search,
    with_overrides,
)
from pipelines.sweep.trial import PARAMS_TAG, PARENT_TAG, SWEEP_TAG, TRIAL_TAG, TrialSettings, run_trial
from pipelines.tracking import RunRef
from pipelines.train_driver import check_splits, run_path, run_splits

TRIALS_CSV = "trials.csv"
TRIALS_MD = "trials.md"
_TRIAL_DIR = re.compile(r"_([0-9a-f]+_\d{5})_")  # <trainable>_<experiment hash>_<index>_<params>_<time>


@dataclass(frozen=True)
class SweepResult:
    """What a sweep left: the parent run, a row per trial (ranked best first), the registered model."""

    sweep_name: str
    experiment_path: str
    tracking_uri: str
    parent_run_id: str
    trials: list[dict[str, Any]]
    metric: str
    best_run_id: str | None
    model_version: str | None
    table_markdown: str
    report_markdown: str | None = None
    columns: list[str] = field(default_factory=list)  # of the trial rows, in table order


def new_sweep_name() -> str:
    return f"sweep-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def check_sweep_name(storage_path: str, sweep_name: str | None, resume: bool) -> None:
    """Refuse a sweep name before anything is made for it (its MLflow parent run, Tune's directory):
    one that is no safe directory name, a new sweep under a used name, or a resume of a sweep that
    is not there. `magnet tune` calls it before Prefect starts, `run_sweep` before its parent run.

    Raises:
        UnsafeNameError: the name cannot be one directory under the storage.
        ValueError: ``resume`` without a name.
        FileNotFoundError: ``resume`` and no sweep of that name under the storage.
        FileExistsError: a new sweep under the name of one the storage holds.
    """
    if sweep_name is None:
        if resume:
            raise ValueError("resume needs the name of the sweep to continue (sweep_name)")
        return
    check_name(sweep_name, "sweep name")
    from ray import tune

    exists = tune.Tuner.can_restore(run_path(storage_path, sweep_name))
    if resume and not exists:
        raise FileNotFoundError(f"no sweep {sweep_name!r} under {storage_path} to resume")
    if not resume and exists:
        raise FileExistsError(f"sweep {sweep_name!r} already exists under {storage_path}: resume it")


def check_sweep_splits(cfg: Config, space: SweepSpace, shards: str, register_best: bool) -> None:
    """`train_driver.check_splits` on every split a sweep reads, before any trial starts: each
    trial's (``cfg`` with the sweep file's overrides, and with each value a grid, a choice or a
    variant may give ``data``), those its report scores at the end, and the first held-out one,
    whose first sample the registered best model keeps as its input example. Found in a trial, a
    corrupt shard would fail every trial that reads it; in the report, only after all of them.

    Raises:
        ShardError: naming the split or the shard (see `check_splits`).
    """
    cfg = with_overrides(cfg, space.overrides) if space.overrides else cfg
    example = held_out_splits(shards, cfg.data.train_split)[:1] if register_best else []
    splits = run_splits(cfg, [*space.report.splits, *example])
    for trial_cfg in data_configs(cfg, space):
        splits += run_splits(trial_cfg)
    check_splits(cfg, shards, list(dict.fromkeys(splits)))


def data_configs(cfg: Config, space: SweepSpace) -> Iterator[Config]:
    """``cfg`` with each value that a grid or choice over a ``data`` field, or a variant, sets: the
    data settings trials may run with (sampled numbers never name a split)."""
    for key, param in space.params.items():
        if param.kind in ("choice", "grid") and (key == VARIANT_KEY or key.startswith("data.")):
            for value in param.values:
                yield apply_params(cfg, {key: value}, space.variants)


# Tune's reservation for a trial's driver process: memory and no CPU (see the module docstring),
# on the head node (a sliver of Ray's resource naming it, as Ray Train's own state actor takes):
# Train's controller lives on its driver's node, so a driver on a worker node would die with it,
# and with it a trial whose workers were elsewhere.
HEAD_NODE = "node:__internal_head__"
TRIAL_DRIVER_RESOURCES = {"memory": 512 * 2**20, HEAD_NODE: 0.001}


def trial_concurrency(
    max_concurrent: int | None, num_workers: int, cpus_per_worker: float, use_gpu: bool
) -> int:
    """Trials that fit at once: each takes its Train workers' CPUs (and GPUs)."""
    import ray

    resources = ray.cluster_resources()
    fits = math.floor(resources.get("CPU", 0) / (num_workers * cpus_per_worker))
    if use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / num_workers))
    if fits < 1:
        raise RuntimeError(
            f"one trial needs {num_workers * cpus_per_worker} CPUs"
            + (f" and {num_workers} GPUs" if use_gpu else "")
            + f" but the Ray cluster has {resources}"
        )
    return min(fits, max_concurrent) if max_concurrent else fits


def _searcher(search: str, seed: int, concurrency: int) -> Any:
    """Optuna's TPE behind a ConcurrencyLimiter, or Tune's variant generator (random and grid),
    which limits itself (Tune ignores max_concurrent_trials for it)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
        return ConcurrencyLimiter(searcher, max_concurrent=concurrency)
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)


def tune_param_space(space: SweepSpace) -> dict[str, Any]:
    """The space as Ray Tune distributions."""
    from ray import tune

    build = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "choice": lambda v: tune.choice(list(v)),
        "grid": lambda v: tune.grid_search(list(v)),
    }
    return {key: build[p.kind](p.values) for key, p in space.params.items()}


def progress_callback(space: SweepSpace, sweep_name: str, num_samples: int) -> Any:
    """A Tune callback writing the sweep's progress line (magnet.progress) at most every 10 s and at
    the end: trials running and finished of all, and the best value of the metric reported so far."""
    from ray.tune import Callback

    total = num_samples * math.prod(len(p.values) for p in space.params.values() if p.kind == "grid")
    better = max if space.mode == "max" else min

    class TrialProgress(Callback):
        def __init__(self) -> None:
            self.every, self.best = progress.Every(), None

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **_: Any) -> None:
            value = result.get(space.metric)
            if value is not None:
                self.best = value if self.best is None else better(self.best, value)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if self.every.due():
                self.line(trials)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.line(trials)

        def line(self, trials: list) -> None:
            running = sum(trial.status == "RUNNING" for trial in trials)
            finished = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
            best = "none yet" if self.best is None else f"{self.best:.4g}"
            progress.LOGGER.info(
                "sweep %s: %d running, %d finished of %d trials; best %s %s",
                sweep_name, running, finished, total, space.metric, best,
            )  # fmt: skip

    return TrialProgress()


def build_scheduler(space: SweepSpace, cfg: Config) -> Any:
    """ASHA on ``space.metric`` (FIFO when early stopping is off); refuses rungs past the last step."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    settings = space.scheduler
    if not settings.early_stopping:
        return FIFOScheduler()
    # ASHA stops every trial that reaches max_t: past the last step, so a finishing trial returns
    # from its Train run (and closes its MLflow run) instead of being killed at its last report
    last_step = cfg.train.max_steps if settings.time_attr == "step" else None
    max_t = settings.max_t or (last_step + 1 if last_step else 10**9)
    if settings.grace_period >= max_t:
        raise SpaceError(
            f"{space.source}: scheduler.grace_period {settings.grace_period} is not before the end of "
            f"training ({settings.time_attr} {max_t - 1}): lower it, or set scheduler.early_stopping: false"
        )
    return AsyncHyperBandScheduler(
        time_attr=settings.time_attr,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
        max_t=max_t,
    )


def _open_parent(
    cfg: Config,
    space: SweepSpace,
    *,
    shards: str,
    tracking_uri: str,
    experiment: str,
    sweep_name: str,
    experiment_path: str,
    search: str,
    num_samples: int,
    resume: bool,
    workers_per_trial: int,
    gpus_per_trial: int,
) -> RunRef:
    """Open (or, resuming, reopen) the sweep's parent run; at the start it records what the report
    needs to say what ran: the space, the command line, what differs from the preset, the budget."""
    from pipelines import tracking

    parent = tracking.start_run(
        cfg,
        shards=shards,
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=sweep_name,
        resume=resume,
        run_path=experiment_path,
        extra_tags={
            SWEEP_KIND_TAG: "sweep",
            SWEEP_TAG: sweep_name,
            "tune.search": search,
            "tune.scheduler": "asha" if space.scheduler.early_stopping else "fifo",
        },
    )
    client = parent.client
    if not client.get_run(parent.run_id).data.params.get("sweep.space"):
        from mlflow.entities import Param

        sched = space.scheduler
        params = {
            "sweep.space": space.as_json(),
            "sweep.search": search,
            "sweep.scheduler": (
                f"asha(time_attr={sched.time_attr}, grace_period={sched.grace_period}, "
                f"reduction_factor={sched.reduction_factor}, max_t={sched.max_t})"
                if sched.early_stopping
                else "fifo (no early stopping)"
            ),
            "sweep.metric": space.metric,
            "sweep.mode": space.mode,
            "sweep.num_samples": str(num_samples),
            "sweep.space_file": space.source,
            REPORT_PARAM: space.report.model_dump_json(),
            COMMAND_PARAM: command_line(),
            OVERRIDES_PARAM: json.dumps(preset_overrides(cfg)),
            "sweep.workers_per_trial": str(workers_per_trial),
            "sweep.gpus_per_trial": str(gpus_per_trial),
        }
        client.log_batch(parent.run_id, params=[Param(k, v) for k, v in params.items()])
        client.log_artifact(parent.run_id, space.source, artifact_path="sweep")
    elif resume:
        client.set_tag(parent.run_id, RESUME_TAG, command_line())
    return parent


def command_line() -> str:
    """This process's command line (``magnet tune ...``), as the sweep's record of what ran it."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def preset_overrides(cfg: Config) -> list[str]:
    """Where ``cfg`` differs from the preset it names (the command's --set and the sweep file's
    overrides), as dotted ``key=value``; against the defaults when ``cfg.name`` is no preset."""
    from magnet.config import ConfigError, load_config

    try:
        preset = load_config(cfg.name).flat()
    except ConfigError:
        preset = Config().flat()
    return [f"{key}={json.dumps(value)}" for key, value in cfg.flat().items() if preset.get(key) != value]


def _child_runs(parent: RunRef) -> dict[str, Any]:
    runs = parent.client.search_runs(
        [parent.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'"
    )
    return {run.data.tags.get(TRIAL_TAG): run for run in runs}


def _finish_trials(results: Any, parent: RunRef, space: SweepSpace) -> list[dict[str, Any]]:
    """Close every trial's child run (early-stopped ones as KILLED) and return ranked rows."""
    from mlflow.entities import Metric
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from pipelines import tracking

    client = parent.client
    children = _child_runs(parent)
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _TRIAL_DIR.search(Path(result.path).name).group(1)
        run = children.get(trial_id)
        history = result.metrics_dataframe
        best = None
        if history is not None and space.metric in history:
            series = history[space.metric].dropna()
            best = float(series.max() if space.mode == "max" else series.min()) if len(series) else None
        status = run.info.status if run else "UNKNOWN"
        # a trial that failed before its first report has no config in its result; its run has
        params = result.config or (json.loads(run.data.tags.get(PARAMS_TAG, "{}")) if run else {})
        if result.error is not None:
            status = "FAILED"
        # a trial ASHA stopped never closed its run (or was marked by an earlier wrap-up)
        early = status == "RUNNING" or (run is not None and run.data.tags.get("tune.early_stopped") == "true")
        checkpoint = (run.data.tags.get("checkpoint.best") if run else None) or metrics.get(
            CHECKPOINT_PATH_KEY
        )
        if run is not None:
            if early:
                client.set_tag(run.info.run_id, "tune.early_stopped", "true")
                if metrics.get(CHECKPOINT_PATH_KEY):
                    client.set_tag(run.info.run_id, "checkpoint.last", metrics[CHECKPOINT_PATH_KEY])
                status = "KILLED"
            if best is not None:
                key = f"best/{tracking.metric_key(space.metric)}"
                client.log_batch(run.info.run_id, metrics=[Metric(key, best, 0, int(metrics.get("step", 0)))])
            if run.info.status != status:
                client.set_terminated(run.info.run_id, status=status)
        rows.append(
            {
                "trial": trial_id,
                "run_id": run.info.run_id if run else None,
                "status": status,
                "early_stopped": early,
                space.metric: metrics.get(space.metric),
                f"best {space.metric}": best,
                "step": metrics.get("step"),
                "checkpoint": checkpoint,
                **{key: params.get(key) for key in space.params},
            }
        )
    reverse = space.mode == "max"
    fallback = -math.inf if reverse else math.inf
    rows.sort(key=lambda r: r["trial"])  # ties keep the trials' order, resumed or not
    rows.sort(key=lambda r: r[space.metric] if r[space.metric] is not None else fallback, reverse=reverse)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _register_best(
    rows: list[dict[str, Any]], parent: RunRef, shards: str, split: str
) -> tuple[str | None, str | None]:
    """Register the best-ranked finished trial's best checkpoint as a version of `magnet` (the one
    registered before when a resumed sweep ends on the same trial)."""
    from pipelines.registry import log_and_register

    for row in rows:
        if row["status"] != "FINISHED" or not row["checkpoint"] or row["run_id"] is None:
            continue
        child = parent.in_same_experiment(row["run_id"])
        with local_checkpoint(row["checkpoint"]) as checkpoint:
            version = log_and_register(child, checkpoint, first_example(shards, split))
        parent.client.set_tag(parent.run_id, "tune.best_run_id", row["run_id"])
        parent.client.set_tag(parent.run_id, "tune.best_model_version", version)
        return row["run_id"], version
    return None, None


def _score_trials(rows: list[dict[str, Any]], parent: RunRef, shards: str, splits: Sequence[str]) -> None:
    """Evaluate every finished trial's best checkpoint on whole splits (whatever eval.max_samples
    capped while it trained); metrics go to its run."""
    from pipelines import tracking

    for row in rows:
        if row["status"] != "FINISHED" or not row["checkpoint"]:
            continue
        metrics = evaluate_model(row["checkpoint"], shards, splits, whole_splits=True).metrics
        row["final"] = metrics
        logger = tracking.MlflowRunLogger(parent.in_same_experiment(row["run_id"]))
        logger.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=int(row["step"] or 0))


def _log_text(parent: RunRef, text: str, name: str) -> None:
    parent.client.log_text(parent.run_id, text, name)


def _checked_config(
    cfg: Config, space: SweepSpace, search: str, workers_per_trial: int, gpus_per_trial: int
) -> Config:
    """The trials' base config (the space's overrides applied), refused with a clear error when the
    search, the resources or the space do not fit it."""
    check_search(space, search)
    if gpus_per_trial and gpus_per_trial != workers_per_trial:
        raise ValueError(
            f"gpus_per_trial={gpus_per_trial} with workers_per_trial={workers_per_trial}: "
            "each Train worker drives one GPU, so they must be equal"
        )
    if space.overrides:
        cfg = with_overrides(cfg, space.overrides)
    check_against(space, cfg)
    return cfg


def _tuner(
    trainable: Any,
    space: SweepSpace,
    scheduler: Any,
    *,
    resume: bool,
    experiment_path: str,
    sweep_name: str,
    storage: str,
    search: str,
    samples: int,
    concurrency: int,
) -> Any:
    """Tune's Tuner of this sweep: restored from its storage when resuming, else a new one."""
    from ray import tune

    if resume:
        return tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(space),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=_searcher(search, space.seed, concurrency),
            scheduler=scheduler,
            num_samples=samples,
        ),
        run_config=tune.RunConfig(
            name=sweep_name,
            storage_path=storage,
            verbose=0,
            callbacks=[progress_callback(space, sweep_name, samples)],
        ),
    )


def _end_after(error: BaseException, parent: RunRef) -> None:
    """End the parent run as the sweep ended (FAILED, or KILLED with its running trials' runs)."""
    from pipelines import tracking

    status = tracking.ended_status(error)
    if status == "KILLED":  # the trials die with this driver: their runs end with the sweep's
        for run in _child_runs(parent).values():
            if run.info.status == "RUNNING":
                parent.client.set_terminated(run.info.run_id, status=status)
    tracking.end_run(parent, status=status)


def run_sweep(
    cfg: Config,
    space: SweepSpace,
    shards: str,
    *,
    storage_path: str,
    tracking_uri: str,
    experiment: str = "magnet-sweeps",
    sweep_name: str | None = None,
    resume: bool = False,
    num_samples: int | None = None,
    search: str | None = None,
    workers_per_trial: int = 1,
    gpus_per_trial: int = 0,
    cpus_per_worker: float = 1.0,
    max_concurrent: int | None = None,
    ray_address: str | None = None,
    max_failures: int = TUNE.max_failures,
    register_best: bool = True,
) -> SweepResult:
    """Run (or, with ``resume``, continue) a sweep: Tune trials of Ray Train runs, tracked in MLflow.

    Args:
        cfg: the base config every trial starts from (the space's ``overrides`` are applied on top).
        space: the validated sweep file (`load_space`).
        shards: prepared dataset root (absolute path or URL).
        storage_path: where Tune and the trials' Train runs keep results and checkpoints
            (absolute path or URL).
        tracking_uri: the MLflow store, absolute (`tracking.resolve_tracking_uri`).
        experiment: MLflow experiment of the parent and child runs.
        sweep_name: the sweep's name (Tune experiment and parent run); None = a new unique name.
        resume: continue the stopped sweep ``sweep_name`` (``Tuner.restore``).
        num_samples: trials (times the grid, when there is one); None = the space's num_samples.
        search: optuna, random or grid; None = the space's.
        workers_per_trial: Ray Train workers per trial.
        gpus_per_trial: GPUs per trial (one per worker); 0 = CPU.
        cpus_per_worker: CPUs reserved per Train worker.
        max_concurrent: at most this many trials at once (never more than the cluster holds).
        ray_address: Ray cluster to join; None = RAY_ADDRESS or a local Ray started here.
        max_failures: worker-group restarts within a trial (from its last checkpoint): a lost worker
            or node costs the trial the steps since that checkpoint, not the trial.
        register_best: register the best finished trial's model as a new version of `magnet`.
    """
    import os

    import ray
    from ray import tune

    from pipelines.ray_workers import QUIET_WORKERS

    search = search or space.search
    cfg = _checked_config(cfg, space, search, workers_per_trial, gpus_per_trial)
    scheduler = build_scheduler(space, cfg)  # refused here when the config cannot run it
    check_sweep_name(storage_path, sweep_name, resume)
    check_sweep_splits(cfg, space, shards, register_best)
    sweep_name = sweep_name or new_sweep_name()
    experiment_path = run_path(storage_path, sweep_name)
    samples = num_samples or space.num_samples
    parent = _open_parent(
        cfg, space, shards=shards, tracking_uri=tracking_uri, experiment=experiment,
        sweep_name=sweep_name, experiment_path=experiment_path, search=search, num_samples=samples,
        resume=resume,
        workers_per_trial=workers_per_trial, gpus_per_trial=gpus_per_trial,
    )  # fmt: skip
    sweep = TrialSettings(
        config=cfg,
        variants=space.variants,
        shards=shards,
        parent=parent,
        experiment=experiment,
        sweep_name=sweep_name,
        train_storage=f"{experiment_path}/train",
        num_workers=workers_per_trial,
        use_gpu=gpus_per_trial > 0,
        cpus_per_worker=cpus_per_worker,
        max_failures=max_failures,
    )
    started_ray = not ray.is_initialized()
    if started_ray:
        # with the dashboard (ray[default]), the state API is how Train's PlacementGroupCleaner
        # notices that ASHA killed a trial and releases that trial's worker group
        ray.init(address=ray_address or os.environ.get("RAY_ADDRESS"), runtime_env=QUIET_WORKERS)
        interrupts.reclaim_sigterm()
    try:
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), TRIAL_DRIVER_RESOURCES)
        concurrency = trial_concurrency(
            max_concurrent, workers_per_trial, cpus_per_worker, gpus_per_trial > 0
        )
        tuner = _tuner(
            trainable, space, scheduler, resume=resume, experiment_path=experiment_path,
            sweep_name=sweep_name, storage=storage_path, search=search, samples=samples,
            concurrency=concurrency,
        )  # fmt: skip
        results = tuner.fit()
    except BaseException as error:
        _end_after(error, parent)
        raise
    finally:
        if started_ray:
            ray.shutdown()
    return _wrap_up(results, parent, space, cfg, shards, sweep_name, experiment_path, register_best)


def _wrap_up(
    results: Any,
    parent: RunRef,
    space: SweepSpace,
    cfg: Config,
    shards: str,
    sweep_name: str,
    experiment_path: str,
    register_best: bool,
) -> SweepResult:
    """Close the trials' runs, rank them, register the best, and write the tables to the parent."""
    from mlflow.entities import Metric

    from pipelines import tracking

    rows = _finish_trials(results, parent, space)
    columns = trial_columns(space)
    table = markdown_table(rows, columns)
    _log_text(parent, csv_table(rows, columns), TRIALS_CSV)
    _log_text(parent, f"# {sweep_name}: trials ranked by {space.metric}\n\n{table}\n", TRIALS_MD)
    client = parent.client
    best_value = next((r[space.metric] for r in rows if r[space.metric] is not None), None)
    if best_value is not None:
        client.log_batch(
            parent.run_id, metrics=[Metric(f"best/{tracking.metric_key(space.metric)}", best_value, 0, 0)]
        )
    client.set_tag(parent.run_id, "tune.trials", str(len(rows)))
    client.set_tag(parent.run_id, "tune.early_stopped", str(sum(r["early_stopped"] for r in rows)))
    report = None
    splits, group_by = space.report.splits, space.report.group_by
    if splits:
        _score_trials(rows, parent, shards, splits)
        if group_by:
            order = space.params[group_by].values
            summary = aggregate(rows, group_by, splits, order)
            summary_columns = [group_by, "n"] + [
                f"{s}/{m} {stat}" for s in splits for m in METRICS for stat in ("mean", "std")
            ]
            report = markdown_table(summary, summary_columns)
            _log_text(parent, csv_table(summary, summary_columns), "report/summary.csv")
            _log_text(parent, f"# {sweep_name}: per {group_by}\n\n{report}\n", "report/summary.md")
            if summary:
                _log_bytes(parent, aggregate_plot(summary, group_by, splits), "report/summary.png")
            groups_columns = [group_by, "split", "group", "n"] + [
                f"{m} {stat}" for m in TABLE_METRICS for stat in ("mean", "std")
            ]
            groups = aggregate_groups(rows, group_by, splits, order)
            _log_text(parent, csv_table(groups, groups_columns), "report/groups.csv")
    best_run, version = (None, None)
    if register_best:
        split = held_out_splits(shards, cfg.data.train_split)[0]
        best_run, version = _register_best(rows, parent, shards, split)
    tracking.end_run(parent)
    return SweepResult(
        sweep_name=sweep_name,
        experiment_path=experiment_path,
        tracking_uri=parent.tracking_uri,
        parent_run_id=parent.run_id,
        trials=rows,
        metric=space.metric,
        best_run_id=best_run,
        model_version=version,
        table_markdown=table,
        report_markdown=report,
        columns=columns,
    )


def _log_bytes(parent: RunRef, data: bytes, name: str) -> None:
    import tempfile

    directory, _, filename = name.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_bytes(data)
        parent.client.log_artifact(parent.run_id, str(path), directory or None)
