"""Locations that are either a local path or an object-storage URL (s3://...): the one place that
tells them apart, and makes a local one absolute for processes that run elsewhere (Ray workers
change their working directory; a run's tags and the registry keep paths for later readers).

Also the one rule for a name that becomes part of a path (a dataset, split, run or sweep name):
`check_name` refuses any that could leave its parent directory or land on another's files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path, PurePath

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
"""One path component of letters, digits, ``.``, ``_``, ``+`` (refcoco+) and ``-``, at most 128
characters, starting with a letter or digit: never ``..``, a separator, a hidden file, a leading
``-`` that reads as an option, or the writers' own ``_``-names (``_work``)."""


class UnsafeNameError(ValueError):
    """A name that would not stay one harmless component of the path it becomes."""


def is_url(location: str | PurePath) -> bool:
    """Whether a location is an fsspec URL (s3://...) rather than a local path."""
    return "://" in str(location)


def absolute_location(location: str | PurePath) -> str:
    """A URL as it is; a local path absolute (``~`` expanded)."""
    text = str(location)
    return text if is_url(text) else str(Path(text).expanduser().resolve())


def check_name(name: str, what: str, reserved: Iterable[str] = ()) -> str:
    """``name`` when it may become a directory or file name under its parent (`SAFE_NAME`, and none
    of ``reserved``, compared ignoring case as some file systems do); else UnsafeNameError naming
    ``what`` it is and why."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise UnsafeNameError(
            f"{what} {name!r} cannot name a directory: use 1 to 128 letters, digits, '.', '_', '+' "
            "or '-', starting with a letter or digit"
        )
    taken = {other.casefold(): other for other in reserved}
    if name.casefold() in taken:
        raise UnsafeNameError(f"{what} {name!r} is reserved: {taken[name.casefold()]} is the writer's own")
    return name
