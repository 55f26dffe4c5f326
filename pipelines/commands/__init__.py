"""The `magnet` command groups, and the argument checks they share."""

from __future__ import annotations

from pathlib import Path

import typer


def require_prepared(shards: Path) -> None:
    """Refuse a --shards directory that `magnet prepare` did not write, before Prefect or Ray start."""
    if not (shards / "summary.json").is_file():
        raise typer.BadParameter(
            f"{shards} holds no summary.json: not a prepared dataset", param_hint="--shards"
        )
