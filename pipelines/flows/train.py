"""The `train-magnet` Prefect flow: open the MLflow run, train on Ray, evaluate the final model on
every held-out split, register it, and leave a markdown report of the metrics. Every split the
flow reads, the final evaluation's included, is checked before Ray starts (run_training).

The flow only puts tasks in order; the work lives in pipelines.train_driver (the Ray Train driver),
pipelines.evaluation, pipelines.tracking and pipelines.registry. The flow is an entry point (a
deployment starts it without `magnet train`): it loads the config and makes every location absolute
once, because Ray runs workers in another directory, and hands the resolved values on; the MLflow
run travels as a `RunRef`, and leaves the flow as plain ``run_id`` and ``tracking_uri`` in its
result (JSON, for a deployment's caller).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from data_prep.paths import absolute_location
from data_prep.synthetic_shards import ensure_synthetic_shards
from magnet.checkpoint import local_checkpoint, read_checkpoint_meta
from magnet.config import Config, load_config
from magnet.data import first_example, held_out_splits
from pipelines import interrupts, mlflow_record
from pipelines import tracking as mlflow_tracking
from pipelines.defaults import TRAIN, absolute_storage
from pipelines.evaluation import evaluate_model
from pipelines.flows import artifact_key
from pipelines.tracking import RunRef
from pipelines.train_driver import (
    check_run_name,
    check_splits,
    new_run_name,
    run_path,
    run_splits,
    run_training,
)


# ----------------------------------------------------------------------------------- tasks
@task(name="open-mlflow-run")
def open_run(
    cfg: Config,
    shards: str,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    resume: bool,
    run_path: str,
) -> RunRef:
    run = mlflow_tracking.start_run(
        cfg,
        shards=shards,
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        resume=resume,
        run_path=run_path,
    )
    get_run_logger().info("MLflow run %s at %s", run.run_id, run.tracking_uri)
    return run


def _kill_opened_run(tracking_uri: str, experiment: str, run_name: str) -> None:
    """Mark KILLED the run `open_run` created or reopened when a Ctrl-C came before the task handed
    it back (its result is lost then): left RUNNING, it would look alive in MLflow for good."""
    opened = mlflow_tracking.find_run(tracking_uri, experiment, run_name)
    if opened is not None and opened.info.status == "RUNNING":
        run = RunRef(tracking_uri, opened.info.experiment_id, opened.info.run_id)
        mlflow_tracking.end_run(run, status="KILLED")


@task(name="train")
def train(
    cfg: Config,
    shards: str,
    *,
    num_workers: int,
    use_gpu: bool,
    placement_strategy: str,
    ray_address: str | None,
    storage_path: str,
    run_name: str,
    resume: bool,
    tracking: RunRef,
    max_failures: int,
    final_splits: list[str],
) -> Any:
    return run_training(
        cfg,
        shards,
        num_workers=num_workers,
        use_gpu=use_gpu,
        placement_strategy=placement_strategy,
        ray_address=ray_address,
        storage_path=storage_path,
        run_name=run_name,
        resume=resume,
        tracking=tracking,
        max_failures=max_failures,
        final_splits=final_splits,
    )


@task(name="evaluate")
def evaluate_final(
    checkpoint: Path,
    shards: str,
    splits: list[str],
    tracking: RunRef,
    step: int,
    pictures_dir: Path | None,
) -> dict[str, Any]:
    """Whole-split metrics of the final checkpoint, logged to the run (pipelines.evaluation).

    Every split is scored here, the one training already evaluated too: the per-expression table
    needs each sample's IoU, which training's sharded evaluation does not keep.
    """
    result = evaluate_model(checkpoint, shards, splits, log_to=tracking, step=step, pictures_dir=pictures_dir)
    return {"protocol": result.describe(), "metrics": result.metrics}


@task(name="register")
def register(tracking: RunRef, checkpoint: Path, shards: str, split: str, aliases: list[str]) -> str:
    from pipelines.registry import log_and_register

    version = log_and_register(tracking, checkpoint, first_example(shards, split), aliases=tuple(aliases))
    get_run_logger().info("registered model magnet version %s", version)
    return version


@task(name="describe-model")
def describe_model(
    tracking: RunRef,
    version: str,
    checkpoint: Path,
    shards: str,
    evaluation: dict[str, Any],
    compute: str,
) -> None:
    """The model card (mlflow_record.model_card) as the registered version's description."""
    card = mlflow_record.model_card(tracking, checkpoint, shards, evaluation, compute)
    mlflow_record.describe_version(tracking.tracking_uri, version, card)


def _compute(num_workers: int, use_gpu: bool) -> str:
    """How the run trained, in words, for the model card."""
    if not use_gpu:
        return f"{num_workers} Ray Train worker(s) on CPU"
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "GPU"
    return f"{num_workers} Ray Train worker(s), one {name} each"


# ------------------------------------------------------------------------------------ flow
def _report(
    cfg: Config, run_name: str, tracking: RunRef, version: str | None, evaluation: dict[str, Any]
) -> str:
    metrics: dict[str, float] = evaluation["metrics"]
    splits = list(dict.fromkeys(key.split("/", 1)[0] for key in metrics))
    names = ["oIoU", "mIoU", "pick_acc", "outline_IoU", "P@0.5", "P@0.7", "P@0.9", "n"]
    lines = [
        f"# train-magnet: {run_name}",
        "",
        f"Config `{cfg.name}`; {evaluation['protocol']}.",
        "",
        "| split | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for split in splits:
        cells = [metrics.get(f"{split}/{name}") for name in names]
        lines.append(
            f"| {split} | "
            + " | ".join("" if c is None else f"{c:.2f}" if c % 1 else f"{c:.0f}" for c in cells)
            + " |"
        )
    lines += ["", f"MLflow: {mlflow_tracking.run_url(tracking)}"]
    if version is not None:
        lines.append(f"Registered model: `models:/magnet/{version}`")
    return "\n".join(lines)


@flow(name="train-magnet", log_prints=True)
def train_magnet(
    config: str = TRAIN.config,
    shards: str | None = None,
    overrides: list[str] | None = None,
    ray_address: str | None = None,
    num_workers: int = TRAIN.num_workers,
    use_gpu: bool = TRAIN.use_gpu,
    placement_strategy: str = TRAIN.placement_strategy,
    experiment: str = TRAIN.experiment,
    run_name: str | None = None,
    resume: bool = TRAIN.resume,
    tracking_uri: str | None = None,
    storage_path: str | None = None,
    eval_splits: list[str] | None = None,
    register_model: bool = TRAIN.register_model,
    aliases: list[str] | None = None,
    max_failures: int = 2,
    pictures_dir: str | None = None,
) -> dict[str, Any]:
    """Train MagNet on prepared shards with Ray Train, tracked and registered in MLflow.

    Args:
        config: preset name (configs/<name>.yaml) or YAML path.
        shards: prepared dataset root ``<out>/<dataset>-<splitBy>``; None generates the synthetic
            demo data under ./demo-run (the embedded default, no download).
        overrides: dotted ``key=value`` config overrides.
        ray_address: Ray cluster to join; None = RAY_ADDRESS or a local Ray.
        num_workers: Ray Train workers.
        use_gpu: one GPU per worker.
        placement_strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (a node per worker).
        experiment: MLflow experiment.
        run_name: unique by default; give the old name with ``resume`` to continue a run.
        resume: continue the run named ``run_name`` from its last checkpoint.
        tracking_uri: MLflow tracking URI; None = MLFLOW_TRACKING_URI or ./mlflow.db.
        storage_path: Ray Train storage (local path or object-storage URL); default ./ray-results.
        eval_splits: splits scored at the end; None = every split but the training one.
        register_model: log the pyfunc model and register a version of `magnet`.
        aliases: registry aliases pointing at the new version.
        max_failures: worker failures Ray Train recovers from (restoring the last checkpoint).
        pictures_dir: also write the final prediction pictures there.
    """
    interrupts.reclaim_sigterm()
    cfg = load_config(config, overrides or [])
    storage = absolute_storage(storage_path)
    store = mlflow_tracking.resolve_tracking_uri(tracking_uri)
    check_run_name(storage, run_name, resume)  # before the MLflow run: a refusal leaves no trace
    run_name = run_name or new_run_name(cfg)
    if shards is None:
        shard_root = str(ensure_synthetic_shards(Path("demo-run").resolve()))
    else:
        shard_root = absolute_location(shards)
    splits = eval_splits or held_out_splits(shard_root, cfg.data.train_split)
    check_splits(cfg, shard_root, run_splits(cfg, splits))  # before the MLflow run, as the name
    try:
        tracking = open_run(cfg, shard_root, store, experiment, run_name, resume, run_path(storage, run_name))
    except KeyboardInterrupt:
        _kill_opened_run(store, experiment, run_name)
        raise
    try:
        mlflow_record.link_flow_run(tracking, key=artifact_key("mlflow-run", run_name))
        result = train(
            cfg,
            shard_root,
            num_workers=num_workers,
            use_gpu=use_gpu,
            placement_strategy=placement_strategy,
            ray_address=ray_address,
            storage_path=storage,
            run_name=run_name,
            resume=resume,
            tracking=tracking,
            max_failures=max_failures,
            final_splits=splits,
        )
        mlflow_record.tag_checkpoints(tracking, result.best_checkpoint, result.last_checkpoint)
        with local_checkpoint(result.best_checkpoint) as checkpoint:
            step = read_checkpoint_meta(checkpoint).step
            evaluation = evaluate_final(
                checkpoint,
                shard_root,
                splits,
                tracking,
                step,
                Path(pictures_dir).resolve() if pictures_dir else None,
            )
            version = None
            if register_model:
                version = register(tracking, checkpoint, shard_root, splits[0], aliases or [])
                compute = _compute(num_workers, use_gpu)
                describe_model(tracking, version, checkpoint, shard_root, evaluation, compute)
    except BaseException as error:
        mlflow_tracking.end_run(tracking, status=mlflow_tracking.ended_status(error))
        raise
    mlflow_tracking.end_run(tracking)
    report = _report(cfg, run_name, tracking, version, evaluation)
    create_markdown_artifact(
        report,
        key=artifact_key("train-magnet", run_name),
        description="Final metrics of the train-magnet run",
    )
    print(report)
    return {
        "run_name": run_name,
        "run_id": tracking.run_id,
        "tracking_uri": tracking.tracking_uri,
        "run_url": mlflow_tracking.run_url(tracking),
        "model_version": version,
        "checkpoint": result.best_checkpoint,
        "protocol": evaluation["protocol"],
        "metrics": evaluation["metrics"],
    }
