"""What the fake upstreams share: run-time control over HTTP, and running in a thread.

A fake keeps its `behaviour` and `stats` in dataclasses; `POST /_fake/config` changes the
behaviour (`{"reset_stats": true}` clears the stats, `{"reset": true}` restores the defaults),
`GET /_fake/stats` reads what it saw.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict, fields
from typing import Any, Generic, Self, TypeVar

import orjson
from aiohttp import web

B = TypeVar("B")
S = TypeVar("S")


class Controls(Generic[B, S]):
    """Mixin: `behaviour` and `stats`, changed and read over HTTP or from code."""

    behaviour: B
    stats: S

    def configure_from(self, changes: dict[str, Any]) -> None:
        known = {f.name for f in fields(self.behaviour)}  # type: ignore[arg-type]
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fake behaviour keys: {sorted(unknown)}")
        for key, value in changes.items():
            setattr(self.behaviour, key, value)

    async def configure(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if body.pop("reset", False):
            self.behaviour = type(self.behaviour)()
        if body.pop("reset_stats", False):
            self.stats = type(self.stats)()
        try:
            self.configure_from(body)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.behaviour))  # type: ignore[call-overload]

    async def read_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(asdict(self.stats)), content_type="application/json")  # type: ignore[call-overload]


class ThreadedServer:
    """An aiohttp app on its own event loop in a daemon thread: `with Server(...) as s: s.port`.

    A client that hangs up cancels its handler (a hang or a stall ends with the connection), and
    stopping waits at most `shutdown_timeout` for requests still in progress."""

    def __init__(self, app: web.Application, name: str, port: int = 0, shutdown_timeout: float = 0.5) -> None:
        self.app = app
        self.port = port
        self.shutdown_timeout = shutdown_timeout
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, handler_cancellation=True,
            shutdown_timeout=self.shutdown_timeout,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def call(self, function: Any) -> Any:
        """Run `function()` on the server's loop (the fakes are not thread-safe) and return its result."""

        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
