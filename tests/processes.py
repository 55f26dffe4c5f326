"""Stopping the server and worker processes the tests start in sessions of their own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_group(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the process's whole group (it was started with start_new_session=True), and SIGKILL
    it if it has not ended within ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):  # the group has ended already
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
