"""The Prefect flows (one module each), and what they share: `artifact_key`, and Prefect's
temporary API server shielded from Ctrl-C.

Without PREFECT_API_URL, Prefect starts a temporary API server in a child process of this one,
in its process group: a Ctrl-C at the terminal reached it too and killed it first, and every
report of the interruption then retried the dead server for minutes (158 s and four tracebacks
for a `magnet train` stopped during set-up). Importing this package makes Prefect start that
server with SIGINT blocked, as Ray starts its own processes; it still stops on the SIGTERM
Prefect sends it at exit, or `pipelines.interrupts` sends it when the process ends the hard way.
"""

from __future__ import annotations

import hashlib
import re
import signal
from typing import Any

from pipelines import interrupts


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from its parts (a stage, and names users chose: a dataset, a run, a
    sweep, an experiment). Prefect takes lowercase letters, digits and dashes only, and refuses any
    other key after the flow's work is done; so every other character becomes a dash, and a key
    that had to change gets 8 hex of the parts' hash, so that `My_Kitchen` and `my-kitchen` (both
    good dataset names) keep reports of their own."""
    text = "-".join(parts)
    key = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if key != text:
        key = f"{key}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return key


def _shield_temporary_server() -> None:
    """Register a SubprocessASGIServer whose process ignores SIGINT as Prefect's temporary server.

    Prefect keeps one server instance per port and asks for the one of port None when it needs a
    temporary API (``SubprocessASGIServer()``); creating ours first makes it that instance.
    """
    from prefect.server.api.server import SubprocessASGIServer

    class ShieldedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> Any:
            # A child process inherits the signal mask of the thread that starts it.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                process = super()._run_uvicorn_command()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            # Prefect stops it at exit; an interrupted `magnet` that ends the hard way runs no exit
            # handler, and a server deaf to SIGINT would outlive it
            interrupts.before_hard_exit(process.terminate)
            return process

    ShieldedServer()


def _uses_temporary_server() -> bool:
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


if _uses_temporary_server():
    _shield_temporary_server()
