"""The Prefect flows (prepare, train, evaluate, tune, promote).

Without PREFECT_API_URL, Prefect starts a temporary API server in a child process of this one,
in its process group: a Ctrl-C at the terminal reached it too and killed it first, and every
report of the interruption then retried the dead server for minutes (158 s and four tracebacks
for a `magnet train` stopped during set-up). Importing this package makes Prefect start that
server with SIGINT blocked, as Ray starts its own processes; it still stops on the SIGTERM
Prefect sends it at exit, or `pipelines.interrupts` sends it when the process ends the hard way.
"""

from __future__ import annotations

import signal
from typing import Any

from pipelines import interrupts


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
