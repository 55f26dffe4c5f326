"""`magnet promote`: move the registry's `champion` alias to the best finished run's model when it
beats the current champion."""

from __future__ import annotations

import typer

from pipelines.commands import DEVICE, TRACKING_URI, require_device, require_prepared, require_store
from pipelines.defaults import PROMOTE


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
    tracking_uri: str | None = TRACKING_URI,
    device: str = DEVICE,
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
    """Add this command to the `magnet` app."""
    app.command("promote")(promote)
