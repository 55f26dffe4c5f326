"""`magnet` commands of the tune group: tune (a Ray Tune sweep), sweep-report (the ablation report
of a finished sweep) and promote (move `champion`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipelines import interrupts
from pipelines.commands import require_device, require_local_cpus, require_prepared, require_store
from pipelines.defaults import PROMOTE, TUNE


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
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="Default: MLFLOW_TRACKING_URI or ./mlflow.db."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Default: RAY_ADDRESS or a local Ray."
    ),
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
    from pipelines.sweep.driver import build_scheduler, check_sweep_name, check_sweep_splits
    from pipelines.sweep.space import SEARCHES, SpaceError, check_search, load_space
    from pipelines.train_driver import absolute_storage

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
    try:  # before Prefect and the sweep's MLflow run
        check_sweep_name(absolute_storage(storage_path), resume, resume is not None)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err), param_hint="--resume") from None
    # every split the trials and the wrap-up read, checked now, not in a trial's traceback (each
    # trial's driver checks its own config's again)
    check_sweep_splits(cfg, parsed, shards, register_best)
    from pipelines.flows.tune import tune_magnet  # Prefect only once the arguments are good
    from pipelines.sweep.driver import new_sweep_name

    sweep_name = resume or new_sweep_name()  # named here, so that an interruption can name it
    interrupts.on_interrupt(lambda: _stopped(sweep_name, storage_path))
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
        storage_path=storage_path,
        ray_address=ray_address,
        max_failures=max_failures,
        register_best=register_best,
        sweep_name=sweep_name,
    )
    typer.echo(json.dumps(result, indent=2))


def _stopped(sweep_name: str, storage_path: str | None) -> str:
    """What an interrupted `magnet tune` left, and the command that continues it: its trials
    resume from their latest checkpoints."""
    from ray import tune

    from pipelines.train_driver import absolute_storage, run_path

    if not tune.Tuner.can_restore(run_path(absolute_storage(storage_path), sweep_name)):
        again = interrupts.magnet_command()
        return f"sweep {sweep_name!r} stopped before Tune started; start again with: {again}"
    again = interrupts.magnet_command("--resume", sweep_name, options=["--resume"])
    return f"sweep {sweep_name!r} stopped; continue with: {again}"


def sweep_report(
    sweep: str = typer.Argument(..., help="Name of the finished sweep (its MLflow parent run)."),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Markdown to write, e.g. docs/results/<sweep>.md; its plots go beside it (.png, -curves.png).",
    ),
    experiment: str = typer.Option("magnet-sweeps", "--experiment", help="MLflow experiment of the sweep."),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="Default: MLFLOW_TRACKING_URI or ./mlflow.db."
    ),
) -> None:
    """Write the ablation report of a finished sweep: mean ± std per variant, split and kind of
    expression, where each variant beats the baseline beyond the spread, and the learning curves
    per kind where the trials were evaluated more than once."""
    if out.suffix != ".md":
        raise typer.BadParameter(f"{out}: the report is markdown, name it <name>.md", param_hint="--out")
    if not out.parent.is_dir():
        raise typer.BadParameter(f"{out.parent} is not a directory", param_hint="--out")
    require_store(tracking_uri)
    from pipelines.sweep.report import read_sweep, write_report

    finished = read_sweep(sweep, experiment, tracking_uri)
    *written, last = write_report(finished, out)
    typer.echo(f"wrote {', '.join(map(str, written))} and {last}")


def promote(
    experiment: str = typer.Option(
        ..., "--experiment", help="MLflow experiment whose finished runs compete."
    ),
    shards: str = typer.Option(..., "--shards", help="Prepared dataset root both models are scored on."),
    metric: str = typer.Option(
        PROMOTE.metric, "--metric", help="Picks the challenger; val_oIoU or val/oIoU."
    ),
    sweep: str | None = typer.Option(
        None, "--sweep", help="Only the child runs of this sweep (parent run id)."
    ),
    min_gain: float = typer.Option(
        PROMOTE.min_gain, "--min-gain", min=0.0, help="Required margin, in metric points."
    ),
    split: str | None = typer.Option(None, "--split", help="Split to score; default: the metric's."),
    protocol: str = typer.Option(PROMOTE.protocol, "--protocol", help="lavt (480 resize) or original size."),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="Default: MLFLOW_TRACKING_URI or ./mlflow.db."
    ),
    device: str = typer.Option(PROMOTE.device, "--device", help="cpu or cuda."),
) -> None:
    """Move `champion` to the best finished run's model when it beats the current champion."""
    if protocol not in ("lavt", "original"):
        raise typer.BadParameter(
            f"{protocol!r} is not a protocol; use lavt or original", param_hint="--protocol"
        )
    require_device(device)
    shards = require_prepared(shards)
    require_store(tracking_uri)
    from pipelines.flows.tune import promote_magnet
    from pipelines.promote import PromotionError

    try:
        result = promote_magnet(
            experiment=experiment,
            shards=shards,
            metric=metric,
            sweep=sweep,
            min_gain=min_gain,
            split=split,
            protocol=protocol,
            tracking_uri=tracking_uri,
            device=device,
        )
    except PromotionError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(result["summary"])


def register(app: typer.Typer) -> None:
    """Add this group's commands to the `magnet` app."""
    app.command("tune")(tune)
    app.command("sweep-report")(sweep_report)
    app.command("promote")(promote)
