"""A tiny TCP round-robin proxy in front of several replicas, for tests and the soak.

    with RoundRobinProxy([("127.0.0.1", 8081), ("127.0.0.1", 8082)]) as proxy:
        proxy.port  # connect here

Each new connection goes to the next upstream in turn; one that refuses the connection (a dead
replica) is skipped for the next one, as nginx's `proxy_next_upstream error` does. It balances
connections, not requests: a client that wants its calls spread sends `Connection: close`.
`proxy.connections` counts the connections each upstream took.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Self


class NoUpstream(ConnectionError):
    """Every upstream refused the connection."""


class RoundRobinProxy:
    def __init__(self, upstreams: list[tuple[str, int]], port: int = 0) -> None:
        self.upstreams = list(upstreams)
        self.port = port
        self.connections: Counter[tuple[str, int]] = Counter()
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="round-robin", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        for _ in range(len(self.upstreams)):
            upstream = self.upstreams[self._next % len(self.upstreams)]
            self._next += 1
            try:
                opened = await asyncio.open_connection(*upstream)
            except OSError:
                continue  # a dead replica: the next one
            self.connections[upstream] += 1
            return opened
        raise NoUpstream(f"none of {self.upstreams} accepts connections")

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            reader, writer = await self._connect()
        except NoUpstream:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, writer), _pipe(reader, client_writer))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of file (or a reset), then close the writing side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
