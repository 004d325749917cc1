"""Concurrent identical calls share one upstream call.

The first call of a key leads: it calls upstream. Calls of the same key that arrive meanwhile join
its flight. A streamed call that joins a streamed leader reads the leader's stream live (`LiveStream`):
the chunks so far at once, then each next one as it arrives. Every other joiner waits for the leader's
answer to be stored, then is served from it. A leader that fails fails its waiters with the same error;
a leader whose answer is not stored (cut short, filtered, no-store) releases the waiters still waiting
to call upstream themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from keel.cache.entry import CachedAnswer
from keel.cost.money import Nanos
from keel.errors import UpstreamTimeout
from keel.pipeline import ChunkStream, StreamClosed


class LiveStream:
    """A leader's stream, read once from upstream by a pump task and read by any number of readers
    (the leader's client and the streamed calls that joined it), each at its own pace.

    The pump reads the next chunk when a reader wants one it does not have yet, or a call waits for
    the whole answer; once the leader's client has left, it reads on to the end for the others (the
    answer is still stored when it completes whole). When no reader is left it closes the upstream.
    It settles the leader's stream itself (cost, then the store), before the readers see the end.
    """

    def __init__(self, source: ChunkStream, saved: Callable[[], Nanos]) -> None:
        self._source = source
        source.settles_at_end = False  # the pump settles it, once the readers no longer need it
        self._saved_of = saved  # () -> Nanos: what the answer cost, read once the source is settled
        self._chunks: list[bytes] = []  # each reader gets its own copy: outer stages change chunks in place
        self._arrived = asyncio.Event()  # replaced after each chunk: readers at the end wait on it
        self._demand = asyncio.Event()  # a reader is at the end and wants the next chunk
        self._leader = True  # the leader's stream is not settled yet (it may not have started reading)
        self._readers = 0
        self._wholes = 0  # calls waiting for the whole answer
        self._eager = False  # the leader's client left: read on to the end for the others
        self._reading = False
        self._abandoned = False
        self.ended = False
        self.error: BaseException | None = None
        self.saved: Nanos = 0  # what the answer cost: set at its end, before the readers see it
        self.pump = asyncio.get_running_loop().create_task(self._run())

    # ------------------------------------------------------------------ the pump

    async def _run(self) -> None:
        source = self._source
        try:
            while not self._abandoned:
                if not (self._eager or self._wholes):
                    await self._demand.wait()
                    if self._abandoned:
                        break
                self._demand.clear()
                self._reading = True
                try:
                    chunk = await source.__anext__()
                finally:
                    self._reading = False
                self._chunks.append(orjson.dumps(chunk))
                self._wake()
        except StopAsyncIteration:
            pass
        except asyncio.CancelledError:  # closed mid-read: every reader left, or the Keel closed
            if self._abandoned and (task := asyncio.current_task()) is not None:
                task.uncancel()  # our own cancel: the stream is closed, not failed
            self._abandoned = True
        except Exception as exc:
            self.error = exc
        finally:
            if self._abandoned:  # a reader never sees a stream cut short as a whole one
                self.error = source.error = StreamClosed("every reader of the stream left before it ended")
            await source.settle()  # cost, then the store: what the answer cost is known after
            if self.error is None and not self._abandoned:
                self.saved = self._saved_of()
            self.ended = True
            self._wake()

    def _wake(self) -> None:
        arrived, self._arrived = self._arrived, asyncio.Event()
        arrived.set()

    def close(self) -> None:
        """Stop reading upstream: the source is closed and settled as cut short."""
        self._abandoned = True
        if self._reading:
            self.pump.cancel()
        else:
            self._demand.set()  # a pump waiting for demand wakes and stops

    # ------------------------------------------------------------------ the readers

    async def read(
        self, rename: str | None = None, until: float | None = None, on_end: Callable[[], None] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """The chunks from the first, live: each with id `rename` when given. `until`: a
        time.monotonic() past which this reader waits for no next chunk (its call's deadline).
        `on_end` is called at a whole stream's end, before the reader sees it."""
        self._readers += 1
        try:
            index = 0
            while True:
                while index < len(self._chunks):
                    chunk = orjson.loads(self._chunks[index])
                    index += 1
                    if rename is not None:
                        chunk["id"] = rename
                    yield chunk
                if self.ended:
                    if self.error is not None:
                        raise self.error
                    if on_end is not None:
                        on_end()
                    return
                await self._next(until)
        finally:
            self._readers -= 1
            self._release()

    async def _next(self, until: float | None) -> None:
        arrived = self._arrived
        self._demand.set()
        if until is None:
            await arrived.wait()
            return
        try:
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                await arrived.wait()
        except TimeoutError:
            raise UpstreamTimeout(
                "this call joined an identical call's stream under way, and its deadline passed before that "
                "stream ended; raise the model's timeout_s, or send the call with Cache-Control: no-cache to "
                "call upstream on its own") from None

    @property
    def closed(self) -> bool:
        """No longer joinable: it stopped reading before the end."""
        return self._abandoned

    async def leader_settled(self) -> None:
        """The leader's stream is settled (read to its end, or its client left, or it was never read):
        the stream reads on to the end for the others, if any (else it is closed), and the leader's
        bookkeeping waits for that end: the cost of the whole answer is the leader's."""
        self._leader = False
        if not self.ended:
            self._eager = True  # the pace is no longer the leader's client's
            self._demand.set()
            self._release()
        await asyncio.wait({self.pump})

    def want_whole(self) -> None:
        """A call waits for the whole answer: keep reading until it stops waiting."""
        self._wholes += 1
        self._demand.set()

    def unwant_whole(self) -> None:
        self._wholes -= 1
        self._release()

    def _release(self) -> None:
        """Close the stream when no one is left to read it."""
        if not (self._leader or self._readers or self._wholes or self.ended):
            self.close()


class Flight:
    """One key's call under way: its answer (stored, an error, or None: call yourselves) and, when
    the leader streams, its live stream (None once it is known there is none)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.answer: asyncio.Future[CachedAnswer | None] = loop.create_future()
        self.live: asyncio.Future[LiveStream | None] = loop.create_future()

    def done(self) -> bool:
        return self.answer.done()

    def go_live(self, stream: LiveStream | None) -> None:
        if not self.live.done():
            self.live.set_result(stream)


class Coalescer:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self._live: set[LiveStream] = set()

    def joined(self, key: str) -> Flight | None:
        """The leader's flight of `key`, when a call of that key is under way."""
        return self._flights.get(key)

    def lead(self, key: str) -> Flight:
        flight = Flight()
        self._flights[key] = flight
        return flight

    def stream(self, flight: Flight, live: LiveStream) -> None:
        """The leader streams: joiners that stream read `live`."""
        self._live.add(live)
        live.pump.add_done_callback(lambda _: self._live.discard(live))
        flight.go_live(live)

    def land(self, key: str, answer: CachedAnswer | BaseException | None) -> None:
        """The leader is done: waiters get its stored answer, its error, or None (call yourselves)."""
        flight = self._flights.pop(key, None)
        if flight is None or flight.answer.done():
            return
        flight.go_live(None)
        if isinstance(answer, BaseException):
            flight.answer.set_exception(answer)
            flight.answer.exception()  # marked retrieved: a leader without waiters is not an unhandled error
        else:
            flight.answer.set_result(answer)

    async def close(self) -> None:
        """Stop every live stream's pump (the Keel is closing) and wait for them to settle."""
        pumps = [live.pump for live in self._live]
        for live in list(self._live):
            live.close()
        if pumps:
            await asyncio.wait(pumps)
