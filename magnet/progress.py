"""Progress lines of the long stages (training steps, prepared chunks, sweep trials), on the
``magnet.progress`` logger at INFO.

They show where something shows them: `magnet` attaches a handler unless `--quiet`, and asks its
Ray workers for them (pipelines/ray_workers.py); a library caller that configures no logging sees
none (Python prints only warnings without a handler).
"""

from __future__ import annotations

import logging
import math
import time

LOGGER = logging.getLogger("magnet.progress")


def duration(seconds: float) -> str:
    """``seconds`` as a person reads a remaining time: 45s, 3m05s, 2h07m."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def time_left(done: int, remaining: int, elapsed: float) -> str:
    """The time ``remaining`` more units take at the pace of the ``done`` ones in ``elapsed`` s."""
    return duration(elapsed / done * remaining) if done > 0 else "?"


class Every:
    """Whether a progress line is due: at most one per ``seconds``, the last one always (a stage
    whose units finish quickly would otherwise print a line per chunk or trial)."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self.start = self._last = time.monotonic()

    def due(self, last: bool = False) -> bool:
        now = time.monotonic()
        if last or now - self._last >= self.seconds:
            self._last = now
            return True
        return False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
