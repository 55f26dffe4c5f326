"""`magnet sweep-report`: the ablation report of a finished sweep, from its MLflow runs."""

from __future__ import annotations

from pathlib import Path

import typer

from pipelines.commands import TRACKING_URI, require_store


def sweep_report(
    sweep: str = typer.Argument(..., help="Name of the finished sweep (its MLflow parent run)."),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Markdown to write, e.g. docs/results/<sweep>.md; its plots go beside it (.png, -curves.png).",
    ),
    experiment: str = typer.Option("magnet-sweeps", "--experiment", help="MLflow experiment of the sweep."),
    tracking_uri: str | None = TRACKING_URI,
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


def register(app: typer.Typer) -> None:
    """Add this command to the `magnet` app."""
    app.command("sweep-report")(sweep_report)
