"""A Prefect server on 127.0.0.1 in its own process, as users run it (an in-process test server
leaves threads behind that break forked DataLoader workers of later tests), and the environment a
CLI user or a worker would have for it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ports import HOST, free_port
from processes import stop_group


@dataclass(frozen=True)
class PrefectServer:
    """A started `prefect server start`; ``env`` has PREFECT_HOME and PREFECT_API_URL set."""

    api: str
    env: dict[str, str]
    process: subprocess.Popen
    log: Path

    def wait(self, timeout_s: float = 180) -> dict[str, str]:
        """Block until the API answers; returns ``env``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2):
                    return self.env
            except OSError as err:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Prefect server did not start: {self.log.read_text()[-2000:]}"
                    ) from err
                time.sleep(0.5)


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[PrefectServer]:
    """Start a Prefect server with its database under ``home``; it is starting, not yet answering,
    when the block begins (``wait()``), so a caller can start other services meanwhile."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            ["prefect", "server", "start", "--host", HOST, "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    api = f"http://{HOST}:{port}/api"
    try:
        yield PrefectServer(api=api, env={**env, "PREFECT_API_URL": api}, process=server, log=log)
    finally:
        stop_group(server)
