"""Writing the preparation's files safely: each appears whole or not at all, a write that cannot
succeed (full disk, read-only or forbidden place) is told from a passing fault, and a local output
is tried once before any work starts."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,  # no space left on device
        errno.EDQUOT,  # disk quota exceeded
        errno.EFBIG,  # file too large (a file-size limit)
        errno.EROFS,  # read-only file system
        errno.EACCES,  # permission denied
        errno.EPERM,  # operation not permitted
        errno.ENOTDIR,  # a path component is a file
        errno.ENAMETOOLONG,
    }
)
"""Write errors no retry can mend: they need a person (free space, another place, permissions)."""


def is_permanent(error: BaseException) -> bool:
    """Whether `error` is an OSError that retrying cannot mend (`PERMANENT_ERRNOS`)."""
    return isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS


def describe(error: OSError, location: str | Path | None = None) -> str:
    """One line for a person: what the system said, and the file unless it is `location` itself."""
    what = error.strerror or str(error)
    named = error.filename is not None and str(error.filename) != str(location)
    return f"{what} ({error.filename})" if named else what


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path` (os.replace,
    atomic), on failure it is removed, so a full disk keeps no half-written file. An OSError that
    names no file (a buffered write failing at close) is raised again naming `path`."""
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def check_writable(directory: Path) -> None:
    """Create `directory` (and its parents) and write and remove a small file in it: a read-only,
    forbidden or full place, or a path through a file, fails here in a moment.

    Raises:
        OSError: what the system refused (`is_permanent` tells whether it will last).
    """
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".magnet-write-check-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"magnet")
            os.fsync(fd)  # a full disk may only say so once the data must land
        finally:
            os.close(fd)
    finally:
        probe.unlink(missing_ok=True)
