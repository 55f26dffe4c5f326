"""Worker processes of the data stages leave Ctrl-C to the process that started them."""

from __future__ import annotations

import signal


def leave_sigint_to_parent() -> None:
    """Pool initializer: ignore SIGINT. A terminal's Ctrl-C reaches every process of its group; a
    worker that took it would die mid-chunk with a KeyboardInterrupt traceback of its own. The
    parent stops the pool instead: pending work is cancelled, running work ends whole (shards and
    markers are written under a temporary name and renamed), SIGTERM still ends a worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
