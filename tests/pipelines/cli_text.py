"""Reading what the `magnet` command printed."""

from __future__ import annotations


def plain(output: str) -> str:
    """The CLI's message without rich's box and line wrapping."""
    return " ".join(output.replace("│", " ").split())


def refused(args: list[str]) -> str:
    """Run `magnet ARGS`; assert it was refused as a user error and return its one line."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]
