"""`magnet register`: a checkpoint no training run produced as a version of `magnet`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipelines.commands import TRACKING_URI, require_prepared


def register_checkpoint(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="Checkpoint directory (from magnet import-weights, or a run's)."
    ),
    shards: str = typer.Option(
        ..., "--shards", help="Prepared dataset it is meant for: tagged on the run, first sample = example."
    ),
    split: str = typer.Option("val", "--split", help="Split whose first sample is the input example."),
    experiment: str = typer.Option("magnet", "--experiment", help="MLflow experiment."),
    aliases: list[str] = typer.Option([], "--alias", help="Registry alias to point at the new version."),
    tracking_uri: str | None = TRACKING_URI,
) -> None:
    """Register a checkpoint that no training run produced (e.g. imported published weights) as a
    new version of `magnet`, in a run of its own carrying its config and the dataset's tags."""
    from magnet.checkpoint import load_config_from_checkpoint
    from magnet.data import first_example, open_split
    from pipelines import mlflow_record, registry
    from pipelines import tracking as mlflow_tracking

    shards = require_prepared(shards)
    open_split(shards, split, verify=False)  # a split the data lacks, named before the run is opened
    try:
        cfg = load_config_from_checkpoint(checkpoint)
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err), param_hint="--checkpoint") from None
    tracking = mlflow_tracking.start_run(
        cfg,
        shards=shards,
        tracking_uri=mlflow_tracking.resolve_tracking_uri(tracking_uri),
        experiment=experiment,
        run_name=f"register-{checkpoint.resolve().name}",
        trains=False,
    )
    try:
        example = first_example(shards, split)
        version = registry.log_and_register(tracking, checkpoint, example, aliases=tuple(aliases))
        card = mlflow_record.model_card(tracking, checkpoint, shards, None, "none here (registered as is)")
        mlflow_record.describe_version(tracking.tracking_uri, version, card)
    except BaseException:
        mlflow_tracking.end_run(tracking, status="FAILED")
        raise
    mlflow_tracking.end_run(tracking)
    typer.echo(json.dumps({"version": version, "run_id": tracking.run_id, "aliases": aliases}))


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `magnet` app."""
    app.command("register")(register_checkpoint)
