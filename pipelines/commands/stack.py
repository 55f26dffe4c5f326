"""`magnet stack up|down|status`: the local Prefect and MLflow servers and the served deployments."""

from __future__ import annotations

from pathlib import Path

import typer

stack_app = typer.Typer(help="The local stack: Prefect server, MLflow server and the served deployments.")


@stack_app.command("up")
def stack_up(
    state_dir: Path = typer.Option(Path(".magnet-stack"), "--state-dir", help="Databases, pid files, logs."),
    prefect_port: int = typer.Option(4200, "--prefect-port"),
    mlflow_port: int = typer.Option(5000, "--mlflow-port"),
) -> None:
    """Start a Prefect server, an MLflow server and the served deployments, on 127.0.0.1."""
    from pipelines.stack import StackError, up

    try:
        typer.echo(up(state_dir, prefect_port=prefect_port, mlflow_port=mlflow_port))
    except StackError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


@stack_app.command("down")
def stack_down(state_dir: Path = typer.Option(Path(".magnet-stack"), "--state-dir")) -> None:
    """Stop what `magnet stack up` started."""
    from pipelines.stack import down

    typer.echo(down(state_dir))


@stack_app.command("status")
def stack_status(state_dir: Path = typer.Option(Path(".magnet-stack"), "--state-dir")) -> None:
    """Which stack processes run, and the addresses to use."""
    from pipelines.stack import status

    typer.echo(status(state_dir))


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the `magnet` app."""
    app.add_typer(stack_app, name="stack")
