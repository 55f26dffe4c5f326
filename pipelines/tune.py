"""The Ray Tune driver: sweeps of MagNet's loss weights (and the paper's ablations) where every
trial is a full Ray Train run, tracked as MLflow child runs of one parent run per sweep.

    space = load_space("configs/sweeps/loss-weights.yaml")
    run_sweep(load_config("tiny"), space, shards, storage_path=..., tracking_uri=...) -> SweepResult

Tune-over-Train (Ray 2.60, Train V2): each trial runs ``_run_trial`` which calls
``pipelines.ray_train.run_training`` (the same per-worker loop as `magnet train`) with its own
ScalingConfig, and a ``TuneReportCallback`` that forwards every evaluated report to the trial, so
ASHA stops bad trials on the validation oIoU. Tune reserves only the trial driver's CPU; Train
reserves the workers itself when the trial starts, so the number of trials running at once is
bounded here by what the cluster holds (``trial_concurrency``), or lower with ``max_concurrent``.
A sweep whose driver died continues with ``resume=True`` and its name (``Tuner.restore``); a
trial that was cut off resumes its Train run from its latest checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from magnet.config import Config, ConfigError, config_from_dict
from magnet.train import NOT_EVALUATED, SCORE_KEY
from pipelines.defaults import TUNE

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
SEARCHES = ("optuna", "random", "grid")
VARIANT_KEY = "variant"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "tune.trial_id"
SWEEP_TAG = "tune.sweep"
TRIALS_CSV = "trials.csv"
TRIALS_MD = "trials.md"
_TRIAL_DIR = re.compile(r"_([0-9a-f]+_\d{5})_")  # <trainable>_<experiment hash>_<index>_<params>_<time>


# ----------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Param:
    """One searched config field: ``key`` dotted (``model.loss.lambda_mg``), ``kind`` one of
    DISTRIBUTIONS, ``values`` the bounds (loguniform, uniform) or the options (choice, grid)."""

    key: str
    kind: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Scheduler:
    """ASHA: a trial reaching ``grace_period * reduction_factor**k`` (in ``time_attr`` units, steps by
    default) is stopped when it is below the top 1/reduction_factor of the trials seen there."""

    grace_period: int = 1
    reduction_factor: int = 2
    time_attr: str = "step"
    max_t: int | None = None
    early_stopping: bool = True  # False: every trial runs to its end (ablations compare finished runs)


@dataclass(frozen=True)
class SweepSpace:
    """A sweep file (configs/sweeps/*.yaml), validated.

    ``variants`` names bundles of config values, picked by the param ``variant`` (the ablation's
    baseline/+MG/...). ``report_splits``: splits every finished trial is scored on at the end;
    ``group_by``: the param whose values the final report aggregates over (mean and std).
    """

    params: dict[str, Param]
    source: str
    metric: str = "val/oIoU"
    mode: str = "max"
    search: str = "optuna"
    num_samples: int = 8
    scheduler: Scheduler = field(default_factory=Scheduler)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    report_splits: tuple[str, ...] = ()
    group_by: str | None = None
    seed: int = 0

    def as_json(self) -> str:
        return json.dumps({k: {p.kind: list(p.values)} for k, p in self.params.items()}, sort_keys=True)


class SpaceError(ValueError):
    """A sweep file that does not describe a valid search space."""


def _config_keys() -> set[str]:
    return set(Config().flat())


def _check_values(source: str, key: str, kind: str, values: Any) -> tuple[Any, ...]:
    where = f"{source}: params.{key}"
    if not isinstance(values, list) or not values:
        raise SpaceError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("loguniform", "uniform"):
        if len(values) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise SpaceError(f"{where}: {kind} needs [low, high] numbers, got {values!r}")
        low, high = (float(v) for v in values)
        if not low < high:
            raise SpaceError(f"{where}: {kind} needs low < high, got {values!r}")
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"{where}: loguniform needs low > 0, got {low}")
        return (low, high)
    return tuple(values)


def _parse_param(source: str, key: str, spec: Any, keys: set[str], variants: Mapping[str, Any]) -> Param:
    if key != VARIANT_KEY and key not in keys:
        raise SpaceError(
            f"{source}: params.{key} is not a config field (e.g. model.loss.lambda_mg, train.lr)"
        )
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(
            f"{source}: params.{key} must be one distribution, e.g. {{loguniform: [1e-5, 1e-3]}}, "
            f"got {spec!r}"
        )
    ((kind, values),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{source}: params.{key}: unknown distribution {kind!r}; use one of {DISTRIBUTIONS}")
    checked = _check_values(source, key, kind, values)
    if key == VARIANT_KEY:
        if kind not in ("choice", "grid"):
            raise SpaceError(f"{source}: params.{key} picks named variants: use choice or grid")
        unknown = [v for v in checked if v not in variants]
        if unknown:
            raise SpaceError(f"{source}: params.{key}: {unknown} not among variants {sorted(variants)}")
    return Param(key, kind, checked)


def load_space(path: str | Path, config: Config | None = None) -> SweepSpace:
    """Read and validate a sweep file; every error names the entry at fault.

    With ``config``, every value a param can take (bounds, options, variants) is also applied to
    it, so a type error ("lr: choice [fast]") surfaces now rather than in trial 37.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise SpaceError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}, line {mark.line + 1} column {mark.column + 1}" if mark else source
        raise SpaceError(f"{where}: not valid YAML: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: expected a mapping at the top level")
    known = {
        "params", "metric", "mode", "search", "num_samples", "scheduler", "variants", "overrides",
        "report", "seed",
    }  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpaceError(f"{source}: unknown top-level key(s) {unknown}; known: {sorted(known)}")
    keys = _config_keys()
    variants = data.get("variants") or {}
    if not isinstance(variants, dict):
        raise SpaceError(f"{source}: variants must map names to {{config key: value}}")
    for name, values in variants.items():
        if not isinstance(values, dict):
            raise SpaceError(f"{source}: variants.{name} must map config keys to values")
        bad = sorted(set(values) - keys)
        if bad:
            raise SpaceError(f"{source}: variants.{name}: {bad} are not config fields")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise SpaceError(f"{source}: params must map config keys to distributions")
    params = {key: _parse_param(source, key, spec, keys, variants) for key, spec in raw_params.items()}
    search = data.get("search", "optuna")
    if search not in SEARCHES:
        raise SpaceError(f"{source}: search {search!r} is not one of {SEARCHES}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise SpaceError(f"{source}: mode must be max or min, got {mode!r}")
    scheduler_data = data.get("scheduler") or {}
    try:
        scheduler = Scheduler(**scheduler_data)
    except TypeError as err:
        raise SpaceError(f"{source}: scheduler: {err}") from None
    if scheduler.grace_period < 1 or scheduler.reduction_factor < 2:
        raise SpaceError(f"{source}: scheduler needs grace_period >= 1 and reduction_factor >= 2")
    if scheduler.max_t is not None and scheduler.grace_period > scheduler.max_t:
        raise SpaceError(
            f"{source}: scheduler.grace_period {scheduler.grace_period} > max_t {scheduler.max_t}"
        )
    report = data.get("report") or {}
    group_by = report.get("group_by")
    if group_by is not None and group_by not in params:
        raise SpaceError(f"{source}: report.group_by {group_by!r} is not a param of the sweep")
    num_samples = data.get("num_samples", 8)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise SpaceError(f"{source}: num_samples must be a positive integer, got {num_samples!r}")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SpaceError(f"{source}: overrides must be a list of dotted key=value strings, got {overrides!r}")
    space = SweepSpace(
        params=params,
        source=source,
        metric=str(data.get("metric", "val/oIoU")),
        mode=mode,
        search=search,
        num_samples=num_samples,
        scheduler=scheduler,
        variants={name: dict(values) for name, values in variants.items()},
        overrides=tuple(overrides),
        report_splits=tuple(report.get("splits") or ()),
        group_by=group_by,
        seed=int(data.get("seed", 0)),
    )
    check_search(space, search)
    if config is not None:
        check_against(space, config)
    return space


def check_search(space: SweepSpace, search: str) -> None:
    """Grid params need a generator that enumerates them; a grid search needs nothing else."""
    grids = [k for k, p in space.params.items() if p.kind == "grid"]
    if search == "optuna" and grids:
        raise SpaceError(
            f"{space.source}: optuna cannot search grid params {grids}; use --search random or grid"
        )
    others = [k for k, p in space.params.items() if p.kind != "grid"]
    if search == "grid" and others:
        raise SpaceError(f"{space.source}: --search grid needs every param as a grid; not: {others}")


def _corners(param: Param) -> tuple[Any, ...]:
    return param.values  # bounds for the continuous ones, every option for the others


def rankable_metrics(cfg: Config) -> list[str]:
    """The metrics every evaluated report of a trial carries, the ones a sweep can rank trials on."""
    from magnet.metrics import PRECISION_THRESHOLDS

    names = ["oIoU", "mIoU", *(f"P@{t:g}" for t in PRECISION_THRESHOLDS)]
    return [f"{split}/{name}" for split in cfg.data.eval_splits for name in names] + [SCORE_KEY]


def check_against(space: SweepSpace, config: Config) -> None:
    """Apply the overrides, each param's bounds/options and each variant to ``config``, and check the
    metric is one a trial reports; ConfigError names the entry."""
    try:
        config = _with_overrides(config, space.overrides)
    except ConfigError as err:
        raise SpaceError(f"{space.source}: {err}") from None
    known = rankable_metrics(config)
    if space.metric not in known:
        raise SpaceError(
            f"{space.source}: metric {space.metric!r} is not reported; one of {', '.join(known)}"
        )
    for name in space.variants:
        try:
            apply_params(config, {VARIANT_KEY: name}, space.variants)
        except ConfigError as err:
            raise SpaceError(f"{space.source}: variants.{name}: {err}") from None
    for key, param in space.params.items():
        for value in _corners(param):
            try:
                apply_params(config, {key: value}, space.variants)
            except ConfigError as err:
                raise SpaceError(f"{space.source}: params.{key} = {value!r}: {err}") from None


def apply_params(
    config: Config,
    values: Mapping[str, Any],
    variants: Mapping[str, Mapping[str, Any]],
    source: str | None = None,
) -> Config:
    """``config`` with a trial's values set (dotted keys; ``variant`` expands to its bundle)."""
    source = source or f"trial values {dict(values)}"
    data = config.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(variants[value] if key == VARIANT_KEY else {key: value})
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = data
        for depth, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                section = ".".join(parents[: depth + 1])
                raise ConfigError(f"{source}: {key}: {section} is not a config section")
            node = node[part]
        node[leaf] = value
    return config_from_dict(data, source=source)


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


# ----------------------------------------------------------------------------------- the trial
def _evaluated_reports_callback() -> Any:
    """Tune's TuneReportCallback, passing on only reports that carry an evaluation: checkpoint-only
    reports lack the metric ASHA and the searcher need (Tune refuses such results)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvaluatedReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get(SCORE_KEY, NOT_EVALUATED) > NOT_EVALUATED:
                super().after_report(run_context, metrics, checkpoint)

    return EvaluatedReports()


def _run_trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial: a Ray Train run of the trial's config, tracked as a child of the sweep's run."""
    import ray.tune

    from pipelines import tracking
    from pipelines.train_driver import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    base = config_from_dict(sweep["config"], source="sweep config")
    cfg = apply_params(base, params, sweep["variants"])
    run_name = f"trial-{trial_id}"
    child = tracking.start_run(
        cfg,
        shards=sweep["shards"],
        tracking_uri=sweep["tracking_uri"],
        experiment=sweep["experiment"],
        run_name=run_name,
        resume=True,  # a restored sweep reopens the trial's run; a new trial gets a new one
        extra_tags={
            PARENT_TAG: sweep["parent_run_id"],
            SWEEP_TAG: sweep["sweep_name"],
            TRIAL_TAG: trial_id,
            "tune.params": json.dumps(params, sort_keys=True),
        },
    )
    train_args = dict(
        num_workers=sweep["num_workers"],
        use_gpu=sweep["use_gpu"],
        cpus_per_worker=sweep["cpus_per_worker"],
        storage_path=sweep["train_storage"],
        run_name=run_name,
        tracking=child,
        max_failures=sweep["max_failures"],
        callbacks=[_evaluated_reports_callback()],
    )
    try:
        result = run_training(cfg, sweep["shards"], **train_args)
    except FileExistsError:  # the sweep was restored: continue this trial's Train run
        result = run_training(cfg, sweep["shards"], resume=True, **train_args)
    client = tracking.client_for(child["tracking_uri"])
    for name, location in (
        ("checkpoint.best", result.best_checkpoint),
        ("checkpoint.last", result.last_checkpoint),
    ):
        if location:
            client.set_tag(child["run_id"], name, location)
    tracking.end_run(child)


# ----------------------------------------------------------------------------------- the driver
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


def trial_concurrency(
    max_concurrent: int | None,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    driver_cpus: float = 1.0,
) -> int:
    """Trials that fit at once: each takes its driver's CPU plus its Train workers (and GPUs)."""
    import ray

    resources = ray.cluster_resources()
    fits = math.floor(resources.get("CPU", 0) / (driver_cpus + num_workers * cpus_per_worker))
    if use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / num_workers))
    if fits < 1:
        raise RuntimeError(
            f"one trial needs {driver_cpus + num_workers * cpus_per_worker} CPUs"
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
    tracking_uri: str | None,
    experiment: str,
    sweep_name: str,
    search: str,
    num_samples: int,
    resume: bool,
) -> dict[str, str]:
    from pipelines import tracking

    settings = tracking.start_run(
        cfg,
        shards=shards,
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=sweep_name,
        resume=resume,
        extra_tags={
            "tune.kind": "sweep",
            SWEEP_TAG: sweep_name,
            "tune.search": search,
            "tune.scheduler": "asha" if space.scheduler.early_stopping else "fifo",
        },
    )
    client = tracking.client_for(settings["tracking_uri"])
    if not client.get_run(settings["run_id"]).data.params.get("sweep.space"):
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
        }
        client.log_batch(settings["run_id"], params=[Param(k, v) for k, v in params.items()])
        client.log_artifact(settings["run_id"], space.source, artifact_path="sweep")
    return settings


def _child_runs(client: Any, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    return {run.data.tags.get(TRIAL_TAG): run for run in runs}


def _finish_trials(results: Any, parent: dict[str, str], space: SweepSpace) -> list[dict[str, Any]]:
    """Close every trial's child run (early-stopped ones as KILLED) and return ranked rows."""
    from mlflow.entities import Metric
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from pipelines import tracking

    client = tracking.client_for(parent["tracking_uri"])
    experiment_id = client.get_run(parent["run_id"]).info.experiment_id
    children = _child_runs(client, experiment_id, parent["run_id"])
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
        params = result.config or (json.loads(run.data.tags.get("tune.params", "{}")) if run else {})
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


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def trial_columns(space: SweepSpace) -> list[str]:
    return ["rank", "trial", "status", space.metric, f"best {space.metric}", "step", *space.params, "run_id"]


def _register_best(
    rows: list[dict[str, Any]], parent: dict[str, str], shards: str, split: str
) -> tuple[str | None, str | None]:
    """Register the best-ranked finished trial's best checkpoint as a version of `magnet` (the one
    registered before when a resumed sweep ends on the same trial)."""
    from magnet.checkpoint import local_checkpoint
    from magnet.data import first_example
    from pipelines import tracking
    from pipelines.registry import log_and_register

    for row in rows:
        if row["status"] != "FINISHED" or not row["checkpoint"] or row["run_id"] is None:
            continue
        child = {"tracking_uri": parent["tracking_uri"], "run_id": row["run_id"]}
        version = log_and_register(child, local_checkpoint(row["checkpoint"]), first_example(shards, split))
        client = tracking.client_for(parent["tracking_uri"])
        client.set_tag(parent["run_id"], "tune.best_run_id", row["run_id"])
        client.set_tag(parent["run_id"], "tune.best_model_version", version)
        return row["run_id"], version
    return None, None


def _score_trials(
    rows: list[dict[str, Any]], parent: dict[str, str], shards: str, splits: Sequence[str]
) -> None:
    """Evaluate every finished trial's best checkpoint on whole splits; metrics go to its run."""
    import torch

    from magnet.checkpoint import load_model_from_checkpoint, local_checkpoint
    from magnet.evaluate import evaluate
    from pipelines import tracking

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for row in rows:
        if row["status"] != "FINISHED" or not row["checkpoint"]:
            continue
        model, cfg = load_model_from_checkpoint(local_checkpoint(row["checkpoint"]), device=device)
        metrics = evaluate(model, shards, cfg, splits=list(splits), device=device).metrics
        row["final"] = metrics
        logger = tracking.MlflowRunLogger(parent["tracking_uri"], row["run_id"])
        logger.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=int(row["step"] or 0))


def aggregate(
    rows: Sequence[Mapping[str, Any]],
    group_by: str,
    splits: Sequence[str],
    order: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Mean and sample std of oIoU and mIoU per value of ``group_by``, over the trials that have
    final scores (the seeds of an ablation variant); groups in ``order`` (the sweep file's, e.g.
    baseline first), others after them as met."""
    import numpy as np

    groups: dict[Any, list[Mapping[str, float]]] = {value: [] for value in order}
    for row in rows:
        if row.get("final"):
            groups.setdefault(row[group_by], []).append(row["final"])
    table = []
    for value, finals in groups.items():
        if not finals:
            continue
        entry: dict[str, Any] = {group_by: value, "n": len(finals)}
        for split in splits:
            for name in ("oIoU", "mIoU"):
                scores = np.array([f[f"{split}/{name}"] for f in finals], dtype=float)
                entry[f"{split}/{name} mean"] = float(scores.mean())
                entry[f"{split}/{name} std"] = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
        table.append(entry)
    return table


def aggregate_plot(table: Sequence[Mapping[str, Any]], group_by: str, splits: Sequence[str]) -> bytes:
    """Bars of mean oIoU and mIoU per group and split, std as error bars; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [str(row[group_by]) for row in table]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    width = 0.8 / max(len(splits), 1)
    x = np.arange(len(names))
    for ax, metric in zip(axes, ("oIoU", "mIoU"), strict=True):
        for i, split in enumerate(splits):
            means = [row[f"{split}/{metric} mean"] for row in table]
            stds = [row[f"{split}/{metric} std"] for row in table]
            ax.bar(x + i * width, means, width, yerr=stds, capsize=3, label=split)
        ax.set_xticks(x + width * (len(splits) - 1) / 2, names, rotation=20)
        ax.set_title(f"{metric} (mean ± std over seeds)")
        ax.set_ylabel("%")
    axes[0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _log_text(parent: dict[str, str], text: str, name: str) -> None:
    from pipelines import tracking

    tracking.client_for(parent["tracking_uri"]).log_text(parent["run_id"], text, name)


def run_sweep(
    cfg: Config,
    space: SweepSpace,
    shards: str | Path,
    *,
    storage_path: str | Path,
    tracking_uri: str | None = None,
    experiment: str = TUNE.experiment,
    sweep_name: str | None = None,
    resume: bool = False,
    num_samples: int | None = None,
    search: str | None = None,
    workers_per_trial: int = TUNE.workers_per_trial,
    gpus_per_trial: int = TUNE.gpus_per_trial,
    cpus_per_worker: float = 1.0,
    max_concurrent: int | None = None,
    ray_address: str | None = None,
    max_failures: int = 0,
    register_best: bool = TUNE.register_best,
) -> SweepResult:
    """Run (or, with ``resume``, continue) a sweep: Tune trials of Ray Train runs, tracked in MLflow.

    Args:
        cfg: the base config every trial starts from (the space's ``overrides`` are applied on top).
        space: the validated sweep file (`load_space`).
        shards: prepared dataset root (path or URL).
        storage_path: where Tune and the trials' Train runs keep results and checkpoints.
        tracking_uri: MLflow; None = MLFLOW_TRACKING_URI or ./mlflow.db.
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
        max_failures: worker-group restarts within a trial.
        register_best: register the best finished trial's model as a new version of `magnet`.
    """
    import os

    import ray
    from ray import tune

    from data_prep.paths import absolute_location as shard_location
    from pipelines.ray_workers import QUIET_WORKERS
    from pipelines.train_driver import absolute_storage

    search = search or space.search
    check_search(space, search)
    if gpus_per_trial and gpus_per_trial != workers_per_trial:
        raise ValueError(
            f"gpus_per_trial={gpus_per_trial} with workers_per_trial={workers_per_trial}: "
            "each Train worker drives one GPU, so they must be equal"
        )
    if space.overrides:
        cfg = _with_overrides(cfg, space.overrides)
    check_against(space, cfg)
    scheduler = build_scheduler(space, cfg)
    shards = shard_location(str(shards))
    storage = absolute_storage(str(storage_path))
    if resume and not sweep_name:
        raise ValueError("resume needs the name of the sweep to continue (sweep_name)")
    sweep_name = sweep_name or new_sweep_name()
    experiment_path = f"{storage.rstrip('/')}/{sweep_name}"
    if resume and not tune.Tuner.can_restore(experiment_path):
        raise FileNotFoundError(f"no sweep {sweep_name!r} under {storage} to resume")
    if not resume and tune.Tuner.can_restore(experiment_path):
        raise FileExistsError(f"sweep {sweep_name!r} already exists under {storage}: resume it")
    samples = num_samples or space.num_samples
    parent = _open_parent(
        cfg, space, shards=shards, tracking_uri=tracking_uri, experiment=experiment,
        sweep_name=sweep_name, search=search, num_samples=samples, resume=resume,
    )  # fmt: skip
    sweep = {
        "config": cfg.model_dump(mode="json"),
        "variants": space.variants,
        "shards": shards,
        "tracking_uri": parent["tracking_uri"],
        "parent_run_id": parent["run_id"],
        "experiment": experiment,
        "sweep_name": sweep_name,
        "train_storage": f"{experiment_path}/train",
        "num_workers": workers_per_trial,
        "use_gpu": gpus_per_trial > 0,
        "cpus_per_worker": cpus_per_worker,
        "max_failures": max_failures,
    }
    started_ray = not ray.is_initialized()
    if started_ray:
        # with the dashboard (ray[default]), the state API is how Train's PlacementGroupCleaner
        # notices that ASHA killed a trial and releases that trial's worker group
        ray.init(address=ray_address or os.environ.get("RAY_ADDRESS"), runtime_env=QUIET_WORKERS)
    try:
        trainable = tune.with_resources(tune.with_parameters(_run_trial, sweep=sweep), {"CPU": 1})
        if resume:
            tuner = tune.Tuner.restore(
                experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=tune_param_space(space),
                tune_config=tune.TuneConfig(
                    metric=space.metric,
                    mode=space.mode,
                    search_alg=_searcher(
                        search,
                        space.seed,
                        trial_concurrency(
                            max_concurrent, workers_per_trial, cpus_per_worker, gpus_per_trial > 0
                        ),
                    ),
                    scheduler=scheduler,
                    num_samples=samples,
                ),
                run_config=tune.RunConfig(name=sweep_name, storage_path=storage, verbose=0),
            )
        results = tuner.fit()
    except BaseException:
        from pipelines import tracking

        tracking.end_run(parent, status="FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()
    return _wrap_up(results, parent, space, cfg, shards, sweep_name, experiment_path, register_best)


def _with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    from magnet.config import parse_overrides

    values: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, sub in node.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            values[prefix] = node

    walk("", parse_overrides(list(overrides)))
    return apply_params(cfg, values, {}, source="overrides")


def _wrap_up(
    results: Any,
    parent: dict[str, str],
    space: SweepSpace,
    cfg: Config,
    shards: str,
    sweep_name: str,
    experiment_path: str,
    register_best: bool,
) -> SweepResult:
    """Close the trials' runs, rank them, register the best, and write the tables to the parent."""
    from mlflow.entities import Metric

    from magnet.data import held_out_splits
    from pipelines import tracking

    rows = _finish_trials(results, parent, space)
    columns = trial_columns(space)
    table = markdown_table(rows, columns)
    _log_text(parent, csv_table(rows, columns), TRIALS_CSV)
    _log_text(parent, f"# {sweep_name}: trials ranked by {space.metric}\n\n{table}\n", TRIALS_MD)
    client = tracking.client_for(parent["tracking_uri"])
    best_value = next((r[space.metric] for r in rows if r[space.metric] is not None), None)
    if best_value is not None:
        client.log_batch(
            parent["run_id"], metrics=[Metric(f"best/{tracking.metric_key(space.metric)}", best_value, 0, 0)]
        )
    client.set_tag(parent["run_id"], "tune.trials", str(len(rows)))
    client.set_tag(parent["run_id"], "tune.early_stopped", str(sum(r["early_stopped"] for r in rows)))
    report = None
    if space.report_splits:
        _score_trials(rows, parent, shards, space.report_splits)
        if space.group_by:
            summary = aggregate(
                rows, space.group_by, space.report_splits, space.params[space.group_by].values
            )
            summary_columns = [space.group_by, "n"] + [
                f"{s}/{m} {stat}"
                for s in space.report_splits
                for m in ("oIoU", "mIoU")
                for stat in ("mean", "std")
            ]
            report = markdown_table(summary, summary_columns)
            _log_text(parent, csv_table(summary, summary_columns), "report/summary.csv")
            _log_text(parent, f"# {sweep_name}: per {space.group_by}\n\n{report}\n", "report/summary.md")
            if summary:
                _log_bytes(
                    parent, aggregate_plot(summary, space.group_by, space.report_splits), "report/summary.png"
                )
    best_run, version = (None, None)
    if register_best:
        split = held_out_splits(shards, cfg.data.train_split)[0]
        best_run, version = _register_best(rows, parent, shards, split)
    tracking.end_run(parent)
    return SweepResult(
        sweep_name=sweep_name,
        experiment_path=experiment_path,
        tracking_uri=parent["tracking_uri"],
        parent_run_id=parent["run_id"],
        trials=rows,
        metric=space.metric,
        best_run_id=best_run,
        model_version=version,
        table_markdown=table,
        report_markdown=report,
        columns=columns,
    )


def _log_bytes(parent: dict[str, str], data: bytes, name: str) -> None:
    import tempfile

    from pipelines import tracking

    directory, _, filename = name.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_bytes(data)
        tracking.client_for(parent["tracking_uri"]).log_artifact(
            parent["run_id"], str(path), directory or None
        )


# ------------------------------------------------------------------------------------ the demo
DEMO_SWEEP_OVERRIDES = (  # on the demo preset: a few steps, one evaluation (of val) at the end
    "data.eval_splits=[val]",
    "train.max_steps=6",
    "train.eval_every=6",
    "train.checkpoint_every=6",
    "train.log_every=1",
)


def run_demo_sweep(
    workdir: Path,
    shards: str | Path,
    *,
    tracking_uri: str,
    experiment: str = "magnet-demo-sweeps",
    trials: int = 2,
    config: str = "demo",
    overrides: Sequence[str] = DEMO_SWEEP_OVERRIDES,
) -> SweepResult:
    """A short sweep of the loss weights for the demo (a few tiny trials, one CPU worker each), so
    a newcomer finds a parent run with a child run per trial in the MLflow UI.

    Its trials are too short to compete with the demo's trained model, so none is registered: that
    spares a model logging and, in a promotion, an evaluation, a minute on 2 cores. No early
    stopping here: the worker group of a trial ASHA kills is released through Ray's state API,
    which needs the dashboard (ray[default]), not installed here.
    """
    from dataclasses import replace

    from magnet.config import CONFIG_DIR, load_config

    cfg = load_config(config, list(overrides))
    space = load_space(CONFIG_DIR / "sweeps" / "loss-weights.yaml", cfg)
    space = replace(space, scheduler=Scheduler(early_stopping=False))
    return run_sweep(
        cfg,
        space,
        shards,
        storage_path=Path(workdir).resolve() / "ray-results",
        tracking_uri=tracking_uri,
        experiment=experiment,
        num_samples=trials,
        search="random",
        register_best=False,
    )
