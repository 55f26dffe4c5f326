"""MLflow tracking for training runs: where the tracking store is, how a run is opened, and the
`RunLogger` the per-worker loop writes curves and prediction pictures through.

The driver opens the run (params, tags, the config) before Ray starts, and hands the workers its
`RunRef`, from which rank 0 builds `MlflowRunLogger`. Its tracking URI is absolute: Ray changes
the working directory of its workers, and a relative ``sqlite:///mlflow.db`` would silently open
a fresh, empty database there.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from data_prep.contract import read_summary_and_sha256
from data_prep.paths import check_name, is_url
from pipelines.defaults import TRAIN

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from magnet.config import Config
    from magnet.evaluate import Evaluation

DEFAULT_EXPERIMENT = TRAIN.experiment
CONTEXT_TAG = "mlflow.data.context"  # MLflow's tag for what an input was used for
DIGEST_LENGTH = 36  # MLflow's limit on a dataset digest: the summary's sha256, cut to fit
ARTIFACT_DIR_NAME = "mlartifacts"
RUN_PATH_TAG = "train.run_path"  # <storage>/<run name>: where the run's Ray checkpoints are
_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
_PARAM_VALUE_LIMIT = 6000
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------- where it lives
def resolve_tracking_uri(
    uri: str | None = None, default_dir: str | Path | None = None, *, existing: bool = False
) -> str:
    """The tracking URI to use, made absolute.

    ``uri`` wins, then ``MLFLOW_TRACKING_URI``, then ``sqlite:///<default_dir or cwd>/mlflow.db``.
    A relative SQLite file or a bare directory becomes absolute against the current directory,
    so the same URI means the same store on every Ray worker.

    Args:
        existing: the caller only reads (a model from the registry): a local store (SQLite file,
            file: directory) must already be there. MLflow creates one on first contact, so a read
            from the wrong folder would leave an empty ./mlflow.db behind and then fail.

    Raises:
        FileNotFoundError: ``existing`` and no store at the URI; the message names the URI and
            where it came from.
    """
    given = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not given:
        base = Path(default_dir) if default_dir is not None else Path.cwd()
        resolved = f"sqlite:///{(base / 'mlflow.db').resolve()}"
    elif given.startswith("sqlite:///"):
        resolved = f"sqlite:///{Path(given[len('sqlite:///') :]).resolve()}"
    elif given.startswith("file:"):
        resolved = Path(urlparse(given).path).resolve().as_uri()
    elif not is_url(given):
        resolved = Path(given).resolve().as_uri()
    else:
        resolved = given
    if existing and not _local_store_exists(resolved):
        source = "given" if uri else "from MLFLOW_TRACKING_URI" if given else "the default: no URI given"
        raise FileNotFoundError(
            f"no MLflow tracking store at {resolved} ({source}): point MLFLOW_TRACKING_URI or "
            "--tracking-uri at the store that holds the model"
        )
    return resolved


def _local_store_exists(tracking_uri: str) -> bool:
    """Whether a SQLite or file: store is on disk; servers (http, databases) count as there."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).is_file()
    if tracking_uri.startswith("file:"):
        return Path(urlparse(tracking_uri).path).is_dir()
    return True


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Absolute artifact root for a new experiment in a local store: next to the SQLite file.

    MLflow's own default is ``./mlruns`` relative to whichever directory the process runs in;
    a tracking server (http) chooses its own store, so there it is None.
    """
    if tracking_uri.startswith("sqlite:///"):
        root = Path(tracking_uri[len("sqlite:///") :]).parent / ARTIFACT_DIR_NAME
        return (root / _safe_dir_name(experiment)).as_uri()
    return None


def _safe_dir_name(name: str) -> str:
    """A free-text MLflow name (an experiment's: "my exp", "..") as one directory name that passes
    `data_prep.paths.check_name`: other characters become ``_``, leading ones that are not a letter
    or digit go, so none is ``..`` or hidden."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", name).lstrip("._+-")[:128]
    return check_name(safe or "experiment", "directory")


@functools.cache
def client_for(tracking_uri: str) -> MlflowClient:
    """The client of a store (runs and registry), one per URI and process."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@dataclass(frozen=True)
class RunRef:
    """One MLflow run as the flows, the sweep, Ray's workers and the registry hand it on.

    Plain fields only, so it pickles into Ray (``train_loop_config``, Tune's parameters) and
    Prefect (task parameters and results); the client is looked up in each process that uses it.

    Args:
        tracking_uri: the store, absolute (`resolve_tracking_uri`): the same on every Ray worker.
        experiment_id: the run's experiment.
        run_id: the run.
    """

    tracking_uri: str
    experiment_id: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return client_for(self.tracking_uri)

    def in_same_experiment(self, run_id: str) -> RunRef:
        """Another run of this store and experiment (a sweep's trial, from its parent)."""
        return RunRef(self.tracking_uri, self.experiment_id, run_id)


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Experiment id by name; a new experiment gets an absolute artifact location."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or pick another name")
        return found.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri, name))


# ------------------------------------------------------------------------------------- run tags
def dataset_tags(shards: str) -> dict[str, str]:
    """Tags identifying the prepared data (``shards``: its absolute root or URL): summary.json's
    sha256, dataset, splitBy, counts, and the mask convention (union, or refer as LAVT / MagNet)
    the figures are scored against."""
    summary, sha256 = read_summary_and_sha256(shards)
    tags = {
        "dataset.summary_sha256": sha256,
        "dataset.path": shards,
        "dataset.dataset": summary.dataset,
        "dataset.splitBy": summary.split_by,
        "dataset.mask_mode": summary.settings.mask_mode,
    }
    for split, count in summary.counts.items():
        tags[f"dataset.count.{split}"] = str(count.written)
        if count.rejected:
            tags[f"dataset.rejected.{split}"] = str(count.rejected)
    return tags


def log_dataset_inputs(run: RunRef, shards: str, splits: Sequence[str], context: str) -> None:
    """Record each split of the shards as an MLflow dataset input of the run.

    One dataset per split (``<dataset>-<splitBy>/<split>``, source = the split's shard folder,
    digest = summary.json's sha256 cut to MLflow's 36 characters, profile = the whole hash, the
    split's counts and the mask convention), because MLflow keeps one input per
    dataset and run: the training split carries context 'training', held-out splits 'evaluation'.
    Logging a split again (a resumed run) adds nothing.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    summary, sha256 = read_summary_and_sha256(shards)
    name = f"{summary.dataset}-{summary.split_by}"
    inputs = []
    for split in splits:
        with warnings.catch_warnings():  # a local path matches both of MLflow's local source types
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(f"{shards.rstrip('/')}/{split}")
        profile = {
            "summary_sha256": sha256,
            "counts": summary.counts[split].model_dump() if split in summary.counts else None,
            "mask_mode": summary.settings.mask_mode,
        }
        dataset = Dataset(
            name=f"{name}/{split}",
            digest=sha256[:DIGEST_LENGTH],
            source_type=source._get_source_type(),
            source=source.to_json(),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, [InputTag(CONTEXT_TAG, context)]))
    run.client.log_inputs(run.run_id, datasets=inputs)


def git_tags(repo: Path = PROJECT_ROOT) -> dict[str, str]:
    """The commit the code ran from (MLflow's standard tag), and whether the tree had changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


# ---------------------------------------------------------------------------------- run creation
def start_run(
    cfg: Config,
    *,
    shards: str,
    tracking_uri: str,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str,
    resume: bool = False,
    extra_tags: Mapping[str, str] | None = None,
    trains: bool = True,
    run_path: str | None = None,
) -> RunRef:
    """Open (or, with ``resume``, reopen by name) the MLflow run of one training.

    Logs the flattened config as params, the dataset and git tags, config.yaml, and the training
    split as the run's dataset input (`log_dataset_inputs`; not when the
    run only registers a checkpoint, ``trains=False``). Returns the run, from which rank 0 builds
    its `MlflowRunLogger`.

    Args:
        shards: the prepared data's absolute root or URL.
        tracking_uri: the store, absolute (`resolve_tracking_uri`).
        run_path: where the run's checkpoints live (``<storage>/<run name>``), tagged
            ``RUN_PATH_TAG``: a resume continues the run of that name that trained there
            (`_find_run`), not another of the same name.
    """
    import yaml
    from mlflow.entities import Param, RunTag

    client = client_for(tracking_uri)
    experiment_id = get_or_create_experiment(client, experiment, tracking_uri)
    run_id = _find_run(client, experiment_id, run_name, run_path) if resume else None
    tags = {**dataset_tags(shards), **git_tags(), "config.name": cfg.name, **(extra_tags or {})}
    if run_path is not None:
        tags[RUN_PATH_TAG] = run_path
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params = [Param(key, _param_value(value)) for key, value in cfg.flat().items()]
        for start in range(0, len(params), _PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[start : start + _PARAMS_PER_BATCH])
        client.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
    else:
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    run = RunRef(tracking_uri, experiment_id, run_id)
    if trains:
        log_dataset_inputs(run, shards, [cfg.data.train_split], "training")
    return run


def find_run(tracking_uri: str, experiment: str, run_name: str) -> Run | None:
    """The run of that name in the experiment a resume would continue (`_find_run`), or None."""
    client = client_for(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    run_id = _find_run(client, found.experiment_id, run_name) if found else None
    return client.get_run(run_id) if run_id else None


def _find_run(
    client: MlflowClient, experiment_id: str, run_name: str, run_path: str | None = None
) -> str | None:
    """The run a resume continues: of the runs of that name (none tagged with another ``run_path``:
    their checkpoints are elsewhere), the one tagged with this ``run_path``, else one that logged
    metrics (a run refused before it trained logged none), the newest first."""
    runs = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    if run_path is not None:
        runs = [run for run in runs if run.data.tags.get(RUN_PATH_TAG, run_path) == run_path]
    if not runs:
        return None
    best = max(
        runs,
        key=lambda run: (
            run_path is not None and run.data.tags.get(RUN_PATH_TAG) == run_path,
            bool(run.data.metrics),
            run.info.start_time,
        ),
    )
    return best.info.run_id


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text[:_PARAM_VALUE_LIMIT]


def metric_key(name: str) -> str:
    """MLflow admits letters, digits, ``_-. /`` in keys: ``val/precision@0.5`` -> ``val/precision_0.5``."""
    return _BAD_KEY_CHARS.sub("_", name)


def end_run(run: RunRef, status: str = "FINISHED") -> None:
    run.client.set_terminated(run.run_id, status=status)


def ended_status(error: BaseException) -> str:
    """The status of a run its code left with ``error``: KILLED when a person stopped it (Ctrl-C,
    SIGTERM: a KeyboardInterrupt), FAILED otherwise."""
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def run_url(run: RunRef) -> str:
    """Where a person looks at the run: the server's page, or the UI command for a local store."""
    uri, experiment_id, run_id = run.tracking_uri, run.experiment_id, run.run_id
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in experiment {experiment_id}: open with `mlflow ui --backend-store-uri {uri}`"


# ----------------------------------------------------------------------------------- the logger
class MlflowRunLogger:
    """The training loop's `RunLogger` on rank 0: metrics and pictures into an existing run.

    Talks to the store through `MlflowClient` with an explicit run id, never the fluent API's
    process-global active run, so it is safe inside Ray workers and beside other runs.

    Args:
        run: the run `start_run` opened.
    """

    def __init__(self, run: RunRef) -> None:
        self.run = run

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_key(k), float(v), now, int(step)) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.run.client.log_batch(self.run.run_id, metrics=batch[start : start + 1000])

    def log_predictions(self, figure_png: bytes, name: str, step: int) -> None:
        """Stored as ``predictions/<name>`` (``.png`` added when missing); the caller puts the step
        in the name, so every evaluation keeps its own picture."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / _safe_dir_name(name if name.endswith(".png") else f"{name}.png")
            path.write_bytes(figure_png)
            self.run.client.log_artifact(self.run.run_id, str(path), artifact_path="predictions")

    def log_evaluation(self, evaluation: Evaluation, step: int) -> None:
        """An evaluation's metrics, how it was scored (tags ``eval.protocol``, ``eval.mask_mode``,
        ``eval.breakdown``, ``eval.description``) and its breakdown table (split x group: oIoU,
        mIoU, pick_acc, outline_IoU, n; pick figures null where not scored) as
        ``evaluation/step%08d.json``, shown in the UI's artifact view.

        Args:
            evaluation: the result of magnet.evaluate.evaluate.
            step: the checkpoint's step.
        """
        from mlflow.entities import RunTag

        from magnet.evaluate import breakdown_rows
        from magnet.metrics import GROUP_METRICS

        self.log_metrics(evaluation.metrics, step)
        tags = {
            "eval.protocol": evaluation.protocol,
            "eval.mask_mode": str(evaluation.mask_mode),
            "eval.breakdown": str(evaluation.breakdown),
            "eval.description": evaluation.describe(),
        }
        self.run.client.log_batch(self.run.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        rows = breakdown_rows(evaluation.metrics)
        if rows:
            columns = {name: [row.get(name) for row in rows] for name in ("split", "group", *GROUP_METRICS)}
            artifact = f"evaluation/step{step:08d}.json"
            self.run.client.log_table(self.run.run_id, data=columns, artifact_file=artifact)
