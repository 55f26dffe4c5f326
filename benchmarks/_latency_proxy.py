"""A TCP relay on 127.0.0.1 that adds a fixed first-byte latency to every HTTP response.

Loopback object storage (moto on 127.0.0.1) answers in milliseconds, real object storage in tens
of milliseconds per request, and that per-request latency is what the shard reader amortises (a
few requests per tar of hundreds of samples against one request per image). Kernel netem is not
available here, so the benchmark puts this relay between the readers and the moto server: bytes
from the client pass straight through; the first bytes of the server's answer to each new request
wait ``latency_ms`` before they are relayed. Kept-alive connections pay it per request too: a
request is "new" whenever the client has sent data since the last answer started.

    with LatencyProxy("http://127.0.0.1:5000", latency_ms=20) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
"""

from __future__ import annotations

import asyncio
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

_CHUNK = 1 << 16


@dataclass
class _Connection:
    """One relayed client connection: whether a request awaits the start of its answer."""

    request_pending: bool = False


class LatencyProxy:
    """Relay 127.0.0.1:<port> -> ``target`` on an asyncio loop in a background thread.

    Args:
        target: the server's URL, ``http://HOST:PORT``.
        latency_ms: added delay before the first byte of each response.
    """

    def __init__(self, target: str, latency_ms: float) -> None:
        parts = urllib.parse.urlsplit(target)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"latency proxy target {target!r} is not http://HOST:PORT")
        if latency_ms < 0:
            raise ValueError(f"latency proxy latency_ms is {latency_ms}, expected >= 0")
        self.target_host, self.target_port = parts.hostname, parts.port
        self.latency_s = latency_ms / 1000
        self.responses = 0  # responses started (= requests answered), for requests-per-sample figures
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: what AWS_ENDPOINT_URL should say."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        if not self._started.wait(timeout=30) or self.port == 0:
            raise RuntimeError("latency proxy did not start listening within 30 s")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            self._loop.run_forever()
        finally:  # drop the open connections before the loop goes
            server.close()
            relays = asyncio.all_tasks(self._loop)
            for relay in relays:
                relay.cancel()
            self._loop.run_until_complete(asyncio.gather(*relays, return_exceptions=True))
            self._loop.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.close()
            return
        connection = _Connection()

        async def request_sent() -> None:
            connection.request_pending = True

        async def response_starts() -> None:
            if connection.request_pending:
                connection.request_pending = False
                self.responses += 1
                await asyncio.sleep(self.latency_s)

        await asyncio.gather(
            _pipe(client_reader, server_writer, request_sent),
            _pipe(server_reader, client_writer, response_starts),
        )


async def _pipe(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, before_write: Callable[[], Awaitable[None]]
) -> None:
    """Copy ``source`` to ``sink`` until either end closes, awaiting ``before_write`` per chunk."""
    try:
        while data := await source.read(_CHUNK):
            await before_write()
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        sink.close()
