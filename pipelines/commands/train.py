"""`magnet train`: train MagNet with Ray Train through the train-magnet flow."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipelines import interrupts
from pipelines.commands import (
    RAY_ADDRESS,
    TRACKING_URI,
    require_local_cpus,
    require_placement,
    require_prepared,
    require_writable,
)
from pipelines.defaults import TRAIN


def train(
    config: str = typer.Option(TRAIN.config, "--config", "-c", help="Preset name or YAML path."),
    shards: str = typer.Option(
        ..., "--shards", help="Prepared dataset root <out>/<dataset>-<splitBy> (directory or s3:// URL)."
    ),
    num_workers: int = typer.Option(TRAIN.num_workers, "--num-workers", min=1, help="Ray Train workers."),
    use_gpu: bool = typer.Option(TRAIN.use_gpu, "--use-gpu", help="One GPU per worker."),
    placement_strategy: str = typer.Option(
        TRAIN.placement_strategy,
        "--placement-strategy",
        help="Workers on the cluster's nodes: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD (a node each).",
    ),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. train.lr=1e-4."),
    experiment: str = typer.Option(TRAIN.experiment, "--experiment", help="MLflow experiment."),
    run_name: str | None = typer.Option(None, "--run-name", help="Default: unique per run."),
    resume: bool = typer.Option(
        TRAIN.resume, "--resume", help="Continue the run --run-name from its checkpoint."
    ),
    ray_address: str | None = RAY_ADDRESS,
    storage_path: str | None = typer.Option(
        None, "--storage-path", help="Ray storage; default ./ray-results."
    ),
    tracking_uri: str | None = TRACKING_URI,
    register_model: bool = typer.Option(
        TRAIN.register_model, "--register/--no-register", help="Register the model."
    ),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Checkpoint whose weights start the run (e.g. from import-weights)."
    ),
) -> None:
    """Train MagNet with Ray Train through the train-magnet flow, tracked in MLflow."""
    from data_prep.paths import UnsafeNameError
    from magnet.config import ConfigError, load_config
    from magnet.data import held_out_splits
    from pipelines.defaults import absolute_storage
    from pipelines.tracking import resolve_tracking_uri
    from pipelines.train_driver import (
        check_run_name,
        check_splits,
        new_run_name,
        run_splits,
    )

    require_local_cpus(num_workers, ray_address, "--num-workers")
    placement_strategy = require_placement(placement_strategy, num_workers, ray_address)
    storage = absolute_storage(storage_path)
    try:  # before Prefect and the MLflow run: a refused name leaves no run behind
        check_run_name(storage, run_name, resume)
    except (UnsafeNameError, FileExistsError) as err:
        raise typer.BadParameter(str(err), param_hint="--run-name") from None
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err), param_hint="--resume") from None
    if init_from is not None:
        if not (init_from / "model.pt").is_file():
            raise typer.BadParameter(
                f"{init_from} holds no model.pt: not a checkpoint", param_hint="--init-from"
            )
        overrides = [*overrides, f"train.init_from={init_from.resolve()}"]  # absolute: Ray changes cwd
    try:
        cfg = load_config(config, overrides)  # fail here, before Prefect and Ray start
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--config/--set") from None
    shards = require_prepared(shards)
    require_writable(storage, "--storage-path")
    # A corrupt shard of any split the run reads (the flow scores the held-out ones at the end)
    # named now, not in a Prefect task's traceback; the driver checks again (one more read of the
    # splits) because the flow is also started without this command
    check_splits(cfg, shards, run_splits(cfg, held_out_splits(shards, cfg.data.train_split)))
    store = resolve_tracking_uri(tracking_uri)
    from pipelines.flows.train import train_magnet  # Prefect only once the arguments are good

    run_name = run_name or new_run_name(cfg)  # named here, so that an interruption can name it
    interrupts.on_interrupt(lambda: _stopped(run_name, storage))
    result = train_magnet(
        config=config,
        shards=shards,
        overrides=overrides,
        ray_address=ray_address,
        num_workers=num_workers,
        use_gpu=use_gpu,
        placement_strategy=placement_strategy,
        experiment=experiment,
        run_name=run_name,
        resume=resume,
        tracking_uri=store,
        storage_path=storage,
        register_model=register_model,
    )
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))


def _stopped(run_name: str, storage: str) -> str:
    """What an interrupted `magnet train` left (under the absolute ``storage``), and the command
    that continues it."""
    from pipelines.train_driver import last_checkpoint_step, run_exists

    if not run_exists(storage, run_name):  # Ray never started it: nothing to resume
        again = interrupts.magnet_command()
        return f"run {run_name!r} stopped before training started; start again with: {again}"
    step = last_checkpoint_step(storage, run_name)
    reached = f"at step {step} (its last checkpoint)" if step is not None else "before its first checkpoint"
    again = interrupts.magnet_command(
        "--run-name", run_name, "--resume", flags=["--resume"], options=["--run-name"]
    )
    return f"run {run_name!r} stopped {reached}; continue with: {again}"


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `magnet` app."""
    app.command("train")(train)
