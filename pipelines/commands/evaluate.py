"""`magnet evaluate`: score a model on whole splits."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipelines.commands import DEVICE, TRACKING_URI, require_device, require_prepared, require_writable


def evaluate(
    model: str = typer.Option(
        ..., "--model", help="models:/magnet@alias, models:/magnet/N, run id, or checkpoint."
    ),
    shards: str = typer.Option(..., "--shards", help="Prepared dataset root (directory or s3:// URL)."),
    splits: list[str] = typer.Option(["val"], "--split", help="Split to score (repeatable)."),
    protocol: str | None = typer.Option(None, "--protocol", help="lavt (model input size) or original."),
    out: Path | None = typer.Option(None, "--out", help="Write the metrics JSON here."),
    tracking_uri: str | None = TRACKING_URI,
    device: str = DEVICE,
) -> None:
    """Score a model on whole splits (every expression) and write oIoU, mIoU, P@t and, where the
    shards carry the images' objects, pick accuracy and outline IoU."""
    from magnet.data import check_text_settings, open_split
    from magnet.evaluate import evaluate as run_evaluation
    from pipelines.registry import check_model_reference, load_model

    if protocol not in (None, "lavt", "original"):
        raise typer.BadParameter(
            f"{protocol!r} is not a protocol; use lavt or original", param_hint="--protocol"
        )
    require_device(device)
    if out is not None:
        require_writable(out.parent, "--out")
    shards = require_prepared(shards)
    check_model_reference(model, tracking_uri)  # a store lookup: cheaper than hashing the shards below
    for split in splits:  # a split the data lacks, or a corrupt shard of any, named before the model loads
        open_split(shards, split)
    try:
        net, cfg = load_model(model, tracking_uri=tracking_uri, device=device)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None
    check_text_settings(shards, cfg.model.text)
    if protocol is not None:
        cfg.eval.protocol = protocol
    result = run_evaluation(net, shards, cfg, splits=splits, device=device)
    report = {"model": model, "shards": shards, **result.as_dict()}
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    typer.echo(text)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `magnet` app."""
    app.command("evaluate")(evaluate)
