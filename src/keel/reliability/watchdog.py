"""The watchdog of a stream after its first chunk: no silence longer than the gap timeout
(`chunk_gap_timeout_s`), nothing past the call's deadline.

One timer per stream, not a timeout per chunk: a chunk costs two clock reads, and the timer
re-arms only when it fires. When it finds the deadline passed, or the upstream silent for longer
than the gap while the reader waits, it cancels the waiting reader, and the cancellation becomes
the timeout error here (the way asyncio.timeout works).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from keel.errors import StreamStalled, UpstreamTimeout
from keel.pipeline import Call

# How the stream ended: None (all of it), an error, or CancelledError (the reader left early).
OnEnd = Callable[[BaseException | None], None]


class StreamWatchdog:
    """Wraps a stream's source; `on_end` hears how it ended, once. Closing it closes the source,
    even when no chunk was pulled through it (the first one waits in the ChunkStream's buffer)."""

    def __init__(self, source: AsyncIterator[dict[str, Any]], call: Call, deployment: str, on_end: OnEnd) -> None:
        self.source = source
        self.call = call
        self.deployment = deployment
        self.on_end = on_end
        self._loop = asyncio.get_running_loop()
        # The loop's clock may differ from time.monotonic (uvloop's has its own origin).
        self._deadline = self._loop.time() + (call.ctx.remaining() or 0.0)
        self._gap = call.model.chunk_gap_timeout_s
        self._waiting_since: float | None = None
        self._reader: asyncio.Task[Any] | None = None
        self._expired: UpstreamTimeout | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ended = False

    def __aiter__(self) -> StreamWatchdog:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._expired is not None:  # the deadline passed while the reader was away
            raise await self._fail(self._expired)
        self._reader = asyncio.current_task()
        self._waiting_since = self._loop.time()
        if self._timer is None:
            self._arm(self._waiting_since)
        try:
            return await self.source.__anext__()
        except StopAsyncIteration:
            self._end(None)
            raise
        except asyncio.CancelledError:
            if self._expired is not None and self._reader is not None and self._reader.uncancel() == 0:
                raise await self._fail(self._expired) from None
            self._end(asyncio.CancelledError())
            raise
        except BaseException as exc:
            self._end(exc)
            raise
        finally:
            self._waiting_since = None

    async def aclose(self) -> None:
        """The reader stopped early: no verdict on the deployment, and the upstream is let go."""
        self._end(asyncio.CancelledError())
        await self._close_source()

    def _arm(self, now: float) -> None:
        due = self._deadline
        if self._gap is not None:
            due = min(due, (self._waiting_since if self._waiting_since is not None else now) + self._gap)
        self._timer = self._loop.call_at(due, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        name = self.deployment
        if now >= self._deadline:
            self._expired = UpstreamTimeout(
                f"the call's deadline (timeout_s = {self.call.model.timeout_s:g} s) passed mid-stream from "
                f"deployment '{name}'; the stream was ended", deployment=name)
        elif self._gap is not None and self._waiting_since is not None and now - self._waiting_since >= self._gap:
            self._expired = StreamStalled(
                f"deployment '{name}' went silent mid-stream for {self._gap:g} s (chunk_gap_timeout_s); "
                "the stream was ended", deployment=name)
        if self._expired is None:
            self._arm(now)
        elif self._waiting_since is not None and self._reader is not None:
            self._reader.cancel()

    def _end(self, outcome: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._ended:
            self._ended = True
            self.on_end(outcome)

    async def _fail(self, error: UpstreamTimeout) -> UpstreamTimeout:
        self._end(error)
        await self._close_source()
        return error

    async def _close_source(self) -> None:
        closer = getattr(self.source, "aclose", None)
        if closer is not None:
            await closer()
