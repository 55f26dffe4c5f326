"""The Ray Train (V2) driver: run magnet.train's loop on N workers, with checkpoints and restarts.

    run_training(cfg, shards, num_workers=2, storage_path=...) -> TrainResult

Each worker runs ``magnet.train.train`` with ``RayReporter``: checkpoints go through
``ray.train.report`` (rank 0 attaches the directory, the others report without one) and a
restarted worker group resumes from ``ray.train.get_checkpoint()``. When a worker dies, Ray
restarts the group up to ``max_failures`` times; a stopped run continues with ``resume=True``
and its name, since Ray Train V2 picks a run's checkpoints up again from
``<storage_path>/<run_name>``. Ray changes the working directory of its workers, so every path
handed to them is absolute: its callers resolve them (the command, or the flow) and pass them on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_prep.paths import check_name
from magnet.checkpoint import META_FILE, CheckpointMeta, checkpoint_name, checkpoint_step
from magnet.config import Config
from magnet.data import check_text_settings, open_split
from magnet.train import NOT_EVALUATED, SCORE_KEY, StepHook, global_batch_mismatch
from pipelines import interrupts

if TYPE_CHECKING:
    from pipelines.tracking import MlflowRunLogger, RunRef

log = logging.getLogger(__name__)

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record, in the run's directory, of the checkpoints it registered: what a resume restores."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished training run left behind.

    Checkpoint locations are ``<storage_path>/<run_name>/<checkpoint dir>``: a local absolute
    path, or a URL when the storage is object storage. ``best_checkpoint`` is the one with the
    highest oIoU on the first eval split (the last one when none was evaluated).
    """

    run_name: str
    storage_path: str
    last_checkpoint: str | None
    best_checkpoint: str | None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def run_path(self) -> str:
        return run_path(self.storage_path, self.run_name)


def run_path(storage_path: str, run_name: str) -> str:
    """``<storage_path>/<run_name>``: where Ray Train keeps a run's checkpoints."""
    return f"{storage_path.rstrip('/')}/{run_name}"


class RayReporter:
    """magnet.train's Reporter on top of Ray Train: report is a barrier over all workers."""

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = (
            ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
        )
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=checkpoint_name(int(metrics["step"])),
        )


class OncePerStep:
    """A RunLogger that drops metrics an earlier life of the run already logged at that step.

    A restarted worker group (a lost worker, or ``resume=True``) redoes the steps after its
    checkpoint; the killed group logged some of them before it died, and MLflow would keep both
    points. Resume is exact, so the points are the same: keeping the first makes each step's point
    appear once. What was logged is read from the run once per key, on the key's first use.

    Args:
        logger: the logger that writes (``pipelines.tracking.MlflowRunLogger``).
    """

    def __init__(self, logger: MlflowRunLogger) -> None:
        self.logger = logger
        self._last_step: dict[str, int] = {}

    def _logged_up_to(self, key: str) -> int:
        from pipelines.tracking import metric_key

        if key not in self._last_step:
            run = self.logger.run
            history = run.client.get_metric_history(run.run_id, metric_key(key))
            self._last_step[key] = max((point.step for point in history), default=-1)
        return self._last_step[key]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {key: value for key, value in metrics.items() if step > self._logged_up_to(key)}
        if fresh:
            self.logger.log_metrics(fresh, step)

    def log_predictions(self, figure_png: bytes, name: str, step: int) -> None:
        self.logger.log_predictions(figure_png, name, step)  # the name carries the step: replaced


def _worker_nodes() -> list[dict[str, str]]:
    """Where every rank of this worker group runs, by rank (a collective: every worker calls it):
    the Ray node id and ``<hostname> (<node IP>)``. Rank 0 records them in the run, so a run shows
    which node each rank trained on, before and after a lost node."""
    import socket

    import ray
    import torch.distributed as dist

    here = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": f"{socket.gethostname()} ({ray.util.get_node_ip_address()})",
    }
    if not dist.is_initialized():
        return [here]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, here)
    return everyone


def _train_worker(config: dict[str, Any]) -> None:
    """The per-worker entry: pick the device and logger, run the loop on the driver's config."""
    import ray.train
    import ray.train.torch
    import torch

    from magnet.train import NullLogger, RunLogger, train

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    workers = _worker_nodes()
    logger: RunLogger = NullLogger()
    monitor: AbstractContextManager[None] = nullcontext()
    run: RunRef | None = config["tracking"]
    if run is not None and ray.train.get_context().get_world_rank() == 0:
        from pipelines.mlflow_record import record_workers, system_metrics
        from pipelines.tracking import MlflowRunLogger

        checkpoint = ray.train.get_checkpoint()  # where a restarted group starts from
        record_workers(run, workers, Path(checkpoint.path).name if checkpoint else None)
        logger = OncePerStep(MlflowRunLogger(run))
        monitor = system_metrics(run)  # on rank 0's node: its CPU, memory and GPUs
    with monitor:
        train(
            config["config"],
            config["shards"],
            reporter=RayReporter(),
            logger=logger,
            device=device,
            hooks=config["hooks"],
        )


def new_run_name(cfg: Config) -> str:
    """``<preset>-<UTC time>-<6 hex>``: unique, so a new run never picks up an old one's checkpoints."""
    return f"{cfg.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def run_exists(storage_path: str, run_name: str) -> bool:
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    info = filesystem.get_file_info(f"{root.rstrip('/')}/{run_name}")
    return info.type != pyarrow.fs.FileType.NotFound


def check_run_name(storage_path: str, run_name: str | None, resume: bool) -> None:
    """Refuse a run name before anything is created for it (an MLflow run, Ray's directory): one that
    is no safe directory name, a new run under a name already used there, or a resume of a run that
    is not there. `magnet train` and the train-magnet flow call it before they open the MLflow run,
    so a refused run leaves no trace; `run_training` calls it again for its other callers.

    Args:
        storage_path: absolute Ray storage (path or URL) the run's checkpoints live under.
        run_name: the run's name; None = a new unique one (not with ``resume``).
        resume: continue the run ``run_name`` from its checkpoints.

    Raises:
        UnsafeNameError: the name cannot be one directory under the storage.
        ValueError: ``resume`` without a name.
        FileNotFoundError: ``resume`` and no run of that name under the storage.
        FileExistsError: a new run under the name of one the storage holds.
    """
    if run_name is not None:
        check_name(run_name, "run name")
    if resume:
        if not run_name:
            raise ValueError("resume needs the name of the run to continue (run_name)")
        if not run_exists(storage_path, run_name):
            raise FileNotFoundError(f"no run {run_name!r} under {storage_path} to resume")
    elif run_name is not None and run_exists(storage_path, run_name):
        raise FileExistsError(
            f"run {run_name!r} already exists under {storage_path}: resume it, or choose another name"
        )


def checkpoint_reports(storage_path: str, run_name: str) -> list[dict[str, Any]]:
    """The metrics reported with each checkpoint a Train run still keeps (its meta.json), by step."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(f"{root.rstrip('/')}/{run_name}"))
    reports = []
    for info in sorted(found, key=lambda info: info.base_name):  # checkpoint_name: zero-padded steps
        if info.type == pyarrow.fs.FileType.Directory and checkpoint_step(info.base_name) is not None:
            where = f"{info.path}/{META_FILE}"
            with filesystem.open_input_stream(where) as stream:
                reports.append(CheckpointMeta.from_bytes(stream.read(), where).metrics)
    return reports


def _location(storage_path: str, run_name: str, checkpoint: Any | None) -> str | None:
    if checkpoint is None:
        return None
    return f"{storage_path.rstrip('/')}/{run_name}/{Path(checkpoint.path).name}"


def _best(best_checkpoints: Sequence[tuple[Any, dict[str, Any]]]) -> Any | None:
    """The evaluated checkpoint with the highest score; None when none was evaluated."""
    scored = [
        (m[SCORE_KEY], c) for c, m in best_checkpoints if m.get(SCORE_KEY, NOT_EVALUATED) > NOT_EVALUATED
    ]
    return max(scored, key=lambda pair: pair[0])[1] if scored else None


def run_splits(cfg: Config, final_splits: Sequence[str] = ()) -> list[str]:
    """Every split a run reads: the training split, ``data.eval_splits`` (evaluated while it trains)
    and ``final_splits`` (those its caller scores at the end), each once."""
    return list(dict.fromkeys([cfg.data.train_split, *cfg.data.eval_splits, *final_splits]))


def check_splits(cfg: Config, shards: str, splits: Sequence[str]) -> None:
    """Check the shards' tokenizer and max_tokens against the model's, then open and checksum every
    split a run will read, on the driver, before any worker starts.

    Restarts cannot cure a corrupt or missing shard: found inside the workers, it would kill them
    ``max_failures`` times over (and an evaluation split only after a whole epoch of training).
    With ``data.skip_corrupt_shards`` the corrupt shards are only named here.

    Raises:
        ShardError: naming the split or the shard, when a split cannot be read as summary.json says;
            naming both values, when the shards were tokenised otherwise than the model reads.
    """
    check_text_settings(shards, cfg.model.text)
    for split in dict.fromkeys(splits):
        opened = open_split(
            shards, split, verify=cfg.data.verify_checksums, skip_corrupt=cfg.data.skip_corrupt_shards
        )
        if opened.skipped:
            log.warning("split %s: skipping corrupt shards %s", split, ", ".join(opened.skipped))


def _fit_off_the_main_thread(trainer: Any) -> Any:
    """``trainer.fit()`` in a helper thread, the main thread waiting for it.

    Run in the main thread, Ray Train replaces the process's SIGINT handler with its own (abort the
    run, then ``sys.exit(0)``) and never puts the previous one back: `magnet`'s handler would be
    lost and an interrupted command would exit as if it had succeeded. Off the main thread Ray
    installs none; a Ctrl-C reaches the main thread here as KeyboardInterrupt, and ray.shutdown()
    (or the driver's exit, which ends the run's actors) stops the run.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # a Tune trial: Tune handles the signals
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the main thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def last_checkpoint_step(storage_path: str, run_name: str) -> int | None:
    """The step a resume of the run starts from: its latest checkpoint that Ray Train registered
    (`RAY_SNAPSHOT`). A checkpoint written just before the run stopped may not be registered yet
    (the controller polls its workers), and a resume does not see it. None when none is."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    snapshot = f"{root.rstrip('/')}/{run_name}/{RAY_SNAPSHOT}"
    if filesystem.get_file_info(snapshot).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(snapshot) as stream:
        registered = json.loads(stream.read())["checkpoint_results"]
    return max((int(result["metrics"]["step"]) for result in registered), default=None)


def run_training(
    cfg: Config,
    shards: str,
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    placement_strategy: str = "PACK",
    ray_address: str | None = None,
    storage_path: str,
    run_name: str | None = None,
    resume: bool = False,
    tracking: RunRef | None = None,
    max_failures: int = 2,
    hooks: Sequence[StepHook] = (),
    callbacks: Sequence[Any] = (),
    final_splits: Sequence[str] = (),
) -> TrainResult:
    """Train ``cfg`` on ``num_workers`` Ray Train workers (DDP: gloo on CPU, NCCL on GPU).

    Args:
        cfg: the resolved config.
        shards: prepared dataset root ``<out>/<dataset>-<splitBy>`` (absolute path or URL).
        num_workers: training workers (DDP ranks).
        use_gpu: one GPU per worker, NCCL and bf16 autocast (if cfg.train.precision says so).
        cpus_per_worker: CPUs Ray reserves per worker.
        placement_strategy: how Ray places the workers on the cluster's nodes (its placement group
            strategy): PACK (as few nodes as possible), SPREAD, STRICT_PACK (one node) or
            STRICT_SPREAD (each worker on a node of its own).
        ray_address: Ray cluster to join; None = RAY_ADDRESS, else a local Ray started here.
        storage_path: where Ray keeps checkpoints (absolute local directory or URL, e.g.
            s3://bucket/runs).
        run_name: the run's name; None = a new unique name.
        resume: continue the stopped run ``run_name`` from its latest checkpoint.
        tracking: the run rank 0 logs to (``pipelines.tracking.MlflowRunLogger``); None = no
            tracking.
        max_failures: worker-group restarts from the latest checkpoint before the run fails.
        hooks: called on every worker after every optimizer step (pickled to the workers).
        callbacks: Ray Train ``UserCallback``s on the controller (the Tune driver passes one that
            forwards reports to its trial).
        final_splits: splits the caller evaluates after training (the train-magnet flow's
            held-out splits), checked with the run's own before Ray starts.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_workers import QUIET_WORKERS

    check_run_name(storage_path, run_name, resume)
    run_name = run_name or new_run_name(cfg)

    mismatch = global_batch_mismatch(cfg, num_workers)
    if mismatch:
        log.warning("%s: lr and schedule are the recipe's, so the run is not comparable", mismatch)

    check_splits(cfg, shards, run_splits(cfg, final_splits))

    started_ray = not ray.is_initialized()
    if started_ray:  # QUIET_WORKERS: also when no `magnet` command set RAY_RUNTIME_ENV_HOOK (a deployment)
        address = ray_address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, runtime_env=QUIET_WORKERS)
        interrupts.reclaim_sigterm()
    try:
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "config": cfg,
                "shards": shards,
                "tracking": tracking,
                "hooks": list(hooks),
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": cpus_per_worker},
                placement_strategy=placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=storage_path,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=cfg.train.keep_checkpoints,
                    checkpoint_score_attribute=SCORE_KEY,
                    checkpoint_score_order="max",
                ),
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                callbacks=list(callbacks),
            ),
        )
        result = _fit_off_the_main_thread(trainer)
    finally:
        if started_ray:
            ray.shutdown()
    last = _location(storage_path, run_name, result.checkpoint)
    best = _location(storage_path, run_name, _best(result.best_checkpoints or []))
    metrics = {
        k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float) and k != SCORE_KEY
    }
    return TrainResult(
        run_name=run_name,
        storage_path=storage_path,
        last_checkpoint=last,
        best_checkpoint=best or last,
        metrics=metrics,
    )
