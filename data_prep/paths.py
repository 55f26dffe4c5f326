"""Locations that are either a local path or an object-storage URL (s3://...): the one place that
tells them apart, and makes a local one absolute for processes that run elsewhere (Ray workers
change their working directory; a run's tags and the registry keep paths for later readers)."""

from __future__ import annotations

from pathlib import Path, PurePath


def is_url(location: str | PurePath) -> bool:
    """Whether a location is an fsspec URL (s3://...) rather than a local path."""
    return "://" in str(location)


def absolute_location(location: str | PurePath) -> str:
    """A URL as it is; a local path absolute (``~`` expanded)."""
    text = str(location)
    return text if is_url(text) else str(Path(text).expanduser().resolve())
