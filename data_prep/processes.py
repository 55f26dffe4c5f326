"""Worker processes of the data stages leave Ctrl-C to the process that started them."""

from __future__ import annotations

import os
import signal
from multiprocessing import util
from types import FrameType
from typing import NoReturn


def leave_sigint_to_parent() -> None:
    """Pool initializer: ignore SIGINT, and end at once on SIGTERM. A terminal's Ctrl-C reaches
    every process of its group; a worker that took it would die mid-chunk with a KeyboardInterrupt
    traceback of its own. The parent stops the pool instead: pending work is cancelled, a running
    chunk is ended by SIGTERM (its partial files removed by the parent), never half-renamed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_now)


def _end_now(signum: int, frame: FrameType | None) -> NoReturn:
    """End this worker, first releasing its named semaphores (a Prefect task run in a pool worker
    holds a queue of them): killed with them, the resource tracker would print a leak warning after
    the command's last line. Only the finalizers of priority >= 0 (semaphores, queue closing) run:
    the others join threads, which could wait on a parent that has stopped reading."""
    util._run_finalizers(0)  # multiprocessing's own first exit step
    os._exit(128 + signum)
