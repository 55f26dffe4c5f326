"""`magnet tune`: a Ray Tune sweep over a space file, each trial a Ray Train run tracked in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipelines import interrupts
from pipelines.commands import (
    RAY_ADDRESS,
    TRACKING_URI,
    require_local_cpus,
    require_prepared,
    require_writable,
)
from pipelines.defaults import TUNE


def tune(
    config: str = typer.Option(
        TUNE.config, "--config", "-c", help="Preset name or YAML path every trial starts from."
    ),
    space: Path = typer.Option(..., "--space", help="Sweep file, e.g. configs/sweeps/loss-weights.yaml."),
    shards: str = typer.Option(
        ..., "--shards", help="Prepared dataset root <out>/<dataset>-<splitBy> (directory or s3:// URL)."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. train.max_steps=2000."),
    trials: int | None = typer.Option(
        None, "--trials", min=1, help="Samples (times the grid); default: the space's."
    ),
    gpus_per_trial: int = typer.Option(
        TUNE.gpus_per_trial, "--gpus-per-trial", min=0, help="GPUs per trial, one per worker."
    ),
    workers_per_trial: int | None = typer.Option(
        None, "--workers-per-trial", min=1, help="Ray Train workers per trial; default: GPUs per trial, or 1."
    ),
    max_concurrent: int | None = typer.Option(
        None, "--max-concurrent", min=1, help="Trials at once at most."
    ),
    search: str | None = typer.Option(None, "--search", help="optuna, random or grid; default: the space's."),
    experiment: str = typer.Option(TUNE.experiment, "--experiment", help="MLflow experiment."),
    resume: str | None = typer.Option(None, "--resume", help="Continue the stopped sweep of this name."),
    storage_path: str | None = typer.Option(
        None, "--storage-path", help="Ray storage; default ./ray-results."
    ),
    tracking_uri: str | None = TRACKING_URI,
    ray_address: str | None = RAY_ADDRESS,
    max_failures: int = typer.Option(
        TUNE.max_failures,
        "--max-failures",
        min=0,
        help="Restarts of a trial's workers from its last checkpoint (a lost worker or node).",
    ),
    register_best: bool = typer.Option(
        TUNE.register_best, "--register/--no-register", help="Register the best trial's model."
    ),
) -> None:
    """Sweep loss weights (or run the ablation) with Ray Tune; each trial is a Ray Train run."""
    from magnet.config import ConfigError, load_config
    from pipelines.defaults import absolute_storage
    from pipelines.sweep.driver import build_scheduler, check_sweep_name, check_sweep_splits
    from pipelines.sweep.space import SEARCHES, SpaceError, check_search, load_space

    if search is not None and search not in SEARCHES:
        raise typer.BadParameter(f"{search!r} is not one of {', '.join(SEARCHES)}", param_hint="--search")
    workers = workers_per_trial or max(gpus_per_trial, 1)
    if gpus_per_trial and workers != gpus_per_trial:
        raise typer.BadParameter(
            f"each Train worker drives one GPU: --workers-per-trial {workers} "
            f"!= --gpus-per-trial {gpus_per_trial}",
            param_hint="--workers-per-trial",
        )
    require_local_cpus(workers, ray_address, "--workers-per-trial")
    try:  # fail here, before Prefect and Ray start
        cfg = load_config(config, overrides)
        parsed = load_space(space, cfg)
        check_search(parsed, search or parsed.search)
        build_scheduler(parsed, cfg)
    except (ConfigError, SpaceError) as err:
        raise typer.BadParameter(str(err), param_hint="--space/--config/--search") from None
    shards = require_prepared(shards)
    storage = absolute_storage(storage_path)
    try:  # before Prefect and the sweep's MLflow run
        check_sweep_name(storage, resume, resume is not None)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err), param_hint="--resume") from None
    # every split the trials and the wrap-up read, checked now, not in a trial's traceback (each
    # trial's driver checks its own config's again)
    require_writable(storage, "--storage-path")
    check_sweep_splits(cfg, parsed, shards, register_best)
    from pipelines.flows.tune import tune_magnet  # Prefect only once the arguments are good
    from pipelines.sweep.driver import new_sweep_name

    sweep_name = resume or new_sweep_name()  # named here, so that an interruption can name it
    interrupts.on_interrupt(lambda: _stopped(sweep_name, storage))
    result = tune_magnet(
        space=str(space),
        config=config,
        shards=shards,
        overrides=overrides,
        trials=trials,
        search=search,
        workers_per_trial=workers,
        gpus_per_trial=gpus_per_trial,
        max_concurrent=max_concurrent,
        experiment=experiment,
        resume=resume,
        tracking_uri=tracking_uri,
        storage_path=storage,
        ray_address=ray_address,
        max_failures=max_failures,
        register_best=register_best,
        sweep_name=sweep_name,
    )
    typer.echo(json.dumps(result, indent=2))


def _stopped(sweep_name: str, storage: str) -> str:
    """What an interrupted `magnet tune` left (under the absolute ``storage``), and the command that
    continues it: its trials resume from their latest checkpoints."""
    from ray import tune

    from pipelines.train_driver import run_path

    if not tune.Tuner.can_restore(run_path(storage, sweep_name)):
        again = interrupts.magnet_command()
        return f"sweep {sweep_name!r} stopped before Tune started; start again with: {again}"
    again = interrupts.magnet_command("--resume", sweep_name, options=["--resume"])
    return f"sweep {sweep_name!r} stopped; continue with: {again}"


def register(app: typer.Typer) -> None:
    """Add this command to the `magnet` app."""
    app.command("tune")(tune)
