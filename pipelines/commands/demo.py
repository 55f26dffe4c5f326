"""`magnet demo`: the whole pipeline on a laptop (pipelines.demo)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipelines import interrupts
from pipelines.commands import require_writable


def demo(
    workdir: Path = typer.Option(Path("demo-run"), "--workdir", help="Everything the demo writes goes here."),
) -> None:
    """The whole pipeline in minutes on a laptop: synthetic data, shards, Ray training on 2 CPU
    workers, evaluation against language-blind baselines, MLflow registry."""
    require_writable(workdir, "--workdir")
    from pipelines.demo import run_demo

    again = interrupts.magnet_command()
    interrupts.on_interrupt(lambda: f"the demo stopped; its data in {workdir} is kept, run again: {again}")
    run_demo(workdir)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `magnet` app."""
    app.command("demo")(demo)
