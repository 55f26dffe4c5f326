"""The `magnet` command groups, and the argument checks they share."""

from __future__ import annotations

from pathlib import Path

import typer


def require_prepared(shards: str | Path) -> str:
    """Refuse a --shards location that `magnet prepare` did not write, before Prefect or Ray start;
    return it as Ray workers need it: a local path absolute, a URL (s3://...) as it is."""
    import fsspec

    location = str(shards) if "://" in str(shards) else str(Path(shards).resolve())
    filesystem, root = fsspec.core.url_to_fs(location)
    if not filesystem.isfile(f"{root.rstrip('/')}/summary.json"):
        raise typer.BadParameter(
            f"{shards} holds no summary.json: not a prepared dataset", param_hint="--shards"
        )
    return location
