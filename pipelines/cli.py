"""The `magnet` command line. Each command group lives in pipelines/commands/<group>.py and
registers itself here; heavy libraries are imported inside the commands, so `--help` is quick.

A mistake in what the user typed or pointed at ends as one line on stderr naming the thing and
what is wrong, with exit code 2 (`magnet --debug ...` shows the traceback instead): the commands
check their inputs before Prefect, Ray or a model load starts, and `MagnetGroup` turns the known
user-error exceptions into that line wherever they surface.

Ctrl-C (SIGINT) or SIGTERM stops any command within seconds with one line saying what stopped
and how to continue, exit 130 / 143 (pipelines/interrupts.py).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperGroup

from pipelines import interrupts
from pipelines.commands import (
    config,
    demo,
    evaluate,
    model,
    plan,
    predict,
    prepare,
    pretrain,
    promote,
    register,
    stack,
    sweep_report,
    synth,
    train,
    tune,
    weights,
)

USAGE_EXIT_CODE = 2  # click's code for a usage error: the same for every mistake of the user's


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean the input is wrong, not the program: shown as one line, exit 2.
    Imported here, when a command fails, so that `--help` stays quick."""
    from magnet.checkpoint import CheckpointError, StateDictMismatch
    from magnet.config import ConfigError
    from magnet.data import ShardError
    from magnet.weights import WeightImportError
    from pipelines.registry import ModelReferenceError
    from pipelines.sweep.report import ReportError
    from pipelines.sweep.space import SpaceError

    return (
        ConfigError,
        ShardError,
        SpaceError,
        ReportError,
        ModelReferenceError,
        StateDictMismatch,
        CheckpointError,
        WeightImportError,
    )


def one_line(message: str) -> str:
    """A multi-line message (pydantic's, a YAML parser's) joined into one line."""
    return "; ".join(line.strip() for line in message.strip().splitlines() if line.strip())


def quiet_known_noise() -> None:
    """Silence what libraries print that is known to be harmless here, before any of them loads:
    Prefect's server sends telemetry (an ERROR line offline), and Ray Train's PlacementGroupCleaner
    warns once a second that it cannot reach the state API (see pipelines.ray_workers). Set in the
    environment, so served deployments and Ray's own processes inherit it; real warnings stay."""
    from pipelines.ray_workers import RUNTIME_ENV_HOOK

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_RUNTIME_ENV_HOOK", RUNTIME_ENV_HOOK)


@contextmanager
def progress_lines(shown: bool) -> Iterator[None]:
    """The long stages' progress lines (magnet.progress) on stderr while a command runs, its Ray
    workers' too (`PROGRESS_ENV`); none when not ``shown`` (`magnet --quiet`). Stdout keeps only
    the command's result."""
    from magnet.progress import LOGGER
    from pipelines.ray_workers import PROGRESS_ENV

    if not shown:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = LOGGER.level, LOGGER.propagate, os.environ.get(PROGRESS_ENV)
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # Prefect's console handler on the root would print them again
    os.environ[PROGRESS_ENV] = "1"
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(saved[0])
        LOGGER.propagate = saved[1]
        if saved[2] is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = saved[2]


class MagnetGroup(TyperGroup):
    """The `magnet` group: one-line help per command in `magnet --help`, and user errors as one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in self.commands.values():  # the docstring's first paragraph, unwrapped
            if command.short_help is None and command.help:
                command.short_help = " ".join(command.help.split("\n\n")[0].split())

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            with interrupts.handled(), progress_lines(shown=not ctx.params.get("quiet")):
                return self._invoke_with_errors_as_lines(ctx)
        except BaseException:
            signum = interrupts.received()  # Ctrl-C or SIGTERM: whatever the clean-up then raised
            if signum is None or ctx.params.get("debug"):
                raise
        interrupts.say(signum)
        raise typer.Exit(interrupts.exit_code(signum))

    def _invoke_with_errors_as_lines(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except typer.BadParameter as err:  # a bad or missing option, and the commands' own checks
            if ctx.params.get("debug"):
                raise
            message = err.format_message()
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:
            if ctx.params.get("debug") or not isinstance(err, _user_errors()):
                raise
            message = str(err)
        typer.echo(f"error: {one_line(message)}", err=True)
        raise typer.Exit(USAGE_EXIT_CODE)


app = typer.Typer(
    name="magnet",
    cls=MagnetGroup,
    help="MagNet Pipeline: prepare RefCOCO-family data, train, tune, evaluate and promote MagNet models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Tracebacks instead of one-line errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines (steps, chunks, trials)."),
) -> None:
    """MagNet Pipeline command line (``debug`` and ``quiet`` are read by MagnetGroup.invoke)."""
    quiet_known_noise()
    stopped = f"magnet {ctx.invoked_subcommand} stopped before it finished; run it again: "
    interrupts.on_interrupt(lambda: stopped + interrupts.magnet_command())  # commands say more


for group in (
    synth,
    prepare,
    model,
    weights,
    pretrain,
    train,
    evaluate,
    predict,
    register,
    demo,
    stack,
    tune,
    sweep_report,
    promote,
    plan,
    config,
):
    group.register(app)


def run() -> None:
    """The `magnet` executable (and ``python -m pipelines.cli``). After an interruption it ends
    without the interpreter's teardown, whose garbage collection of torch, Ray and Prefect took
    20 to 35 s on a busy 2-core machine after the line was printed (`interrupts.end_process`)."""
    try:
        app()
    except SystemExit as done:
        if interrupts.received() is None:
            raise
        interrupts.end_process(done.code if isinstance(done.code, int) else 1)


if __name__ == "__main__":
    run()
