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
    """A leader's stream, read once from upstream and read by any number of readers (the leader's
    client and the streamed calls that joined it), each at its own pace.

    Alone, the leader's client reads the upstream itself, inline: no task, no event, each chunk handed
    on as it came (a snapshot of it, as bytes, is kept for calls that may join: outer stages change
    the leader's chunks in place). Once someone else reads or waits (a streamed joiner, a call waiting
    for the whole answer, or readers left when the leader's client leaves), a pump task reads it
    instead (after the leader's read under way, if any): a joiner's deadline, or its client leaving,
    must never cancel the read the others wait for. The pump reads the next chunk when a reader wants
    one it does not have yet, or a call waits for the whole answer; once the leader's client has left,
    it reads on to the end for the others (the answer is still stored when it completes whole). When no
    reader is left the upstream is closed. The stream is settled (cost, then the store) before the
    readers see its end.

    A leader's client that leaves by cancelling its read under way (the gateway's client disconnecting)
    cuts the upstream stream: a streamed call that joins during that read therefore waits for it
    (`join`) before it reads anything, and calls upstream itself if it was cut.
    """

    def __init__(self, source: ChunkStream, saved: Callable[[], Nanos], on_end: Callable[[], None]) -> None:
        self._source = source
        source.settles_at_end = False  # settled here, once the readers no longer need it
        self._saved_of = saved  # () -> Nanos: what the answer cost, read once the source is settled
        self._on_end = on_end
        self._chunks: list[bytes] = []  # each joiner gets its own copy: outer stages change chunks in place
        self._arrived: asyncio.Event | None = None  # made when someone waits for the next chunk; set when it comes
        self._pump: asyncio.Task[None] | None = None  # started once the stream is shared
        self._demand: asyncio.Event | None = None  # the pump's: a reader is at the end and wants the next chunk
        self._leader = True  # the leader's stream is not settled yet (it may not have started reading)
        self._readers = 0
        self._wholes = 0  # calls waiting for the whole answer
        self._eager = False  # the leader's client left: read on to the end for the others
        self._reading: asyncio.Task[Any] | None = None  # the task whose upstream read is under way
        self._closing = False  # close() cancelled the read under way
        self._abandoned = False
        self._finishing = False
        self._end = asyncio.Event()  # set once settled and ended
        self.ended = False
        self.error: BaseException | None = None
        self.saved: Nanos = 0  # what the answer cost: set at its end, before the readers see it

    # ------------------------------------------------------------------ reading upstream

    async def _read_inline(self) -> dict[str, Any] | None:
        """The next chunk, read by the leader's client itself (the stream is not shared); None at the
        stream's end or failure (then settled: `ended` and `error` say which)."""
        task = asyncio.current_task()
        self._reading = task
        try:
            chunk = await self._source.__anext__()
        except StopAsyncIteration:
            self._reading = None
        except asyncio.CancelledError:
            self._reading = None
            self._abandoned = True  # the read was cut: nothing after it can be trusted
            if not (self._closing and task is not None):
                self._wake()  # a pump waiting for this read stops
                raise  # the leader's client left mid-read: its settlement settles the stream
            task.uncancel()  # our own cancel (the Keel is closing): the stream is closed, not failed
        except Exception as exc:
            self._reading = None
            self.error = exc
        else:
            self._reading = None
            self._chunks.append(orjson.dumps(chunk))
            self._wake()  # a pump started meanwhile waits for this read
            return chunk
        await self._finish()
        return None

    def _share(self) -> None:
        """Someone else reads or waits: from now on the pump reads upstream."""
        if self._pump is None and not (self._finishing or self._abandoned):
            self._demand = asyncio.Event()
            self._pump = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        source, demand = self._source, self._demand
        assert demand is not None
        try:
            while self._reading is not None:  # the leader's read under way: it is this one's to finish
                await self._waiter().wait()
            while not (self._abandoned or self._finishing):
                if not (self._eager or self._wholes):
                    await demand.wait()
                    if self._abandoned:
                        break
                demand.clear()
                self._reading = asyncio.current_task()
                try:
                    chunk = await source.__anext__()
                finally:
                    self._reading = None
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
            await self._finish()

    async def _finish(self) -> None:
        """Settle the source (cost, then the store) and end the stream, once; a second caller waits
        for the first."""
        if self._finishing:
            await self._end.wait()
            return
        self._finishing = True
        source = self._source
        try:
            if self._abandoned:  # a reader never sees a stream cut short as a whole one
                self.error = source.error = StreamClosed("every reader of the stream left before it ended")
            await source.settle()  # cost, then the store: what the answer cost is known after
            if self.error is None and not self._abandoned:
                self.saved = self._saved_of()
        finally:
            self.ended = True
            self._end.set()
            self._wake()
            self._on_end()

    def _waiter(self) -> asyncio.Event:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        return self._arrived

    def _wake(self) -> None:
        """A chunk arrived, or the end: whoever waits for it (no one, while the leader reads alone)."""
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None

    def close(self) -> None:
        """Stop reading upstream: the source is closed and settled as cut short (by the pump, the read
        under way, or `settled()`)."""
        self._abandoned = True
        if self._reading is not None:
            self._closing = True
            self._reading.cancel()
        elif self._demand is not None:
            self._demand.set()  # a pump waiting for demand wakes and stops

    async def settled(self) -> None:
        """Wait for the stream's end (settling it here when nothing else will)."""
        if self._pump is not None:
            await asyncio.wait({self._pump})
        elif self._reading is not None:
            await self._end.wait()
        await self._finish()

    # ------------------------------------------------------------------ the readers

    async def read(
        self, rename: str | None = None, until: float | None = None, on_end: Callable[[], None] | None = None,
        *, leads: bool = False,
    ) -> AsyncIterator[dict[str, Any]]:
        """The chunks from the first, live: each with id `rename` when given. `until`: a
        time.monotonic() past which this reader waits for no next chunk (its call's deadline).
        `on_end` is called at a whole stream's end, before the reader sees it. `leads`: the leader's
        client, which reads upstream itself while no one else reads."""
        self._readers += 1
        if not leads:
            self._share()
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
                if self._pump is not None:
                    await self._next(until)
                elif self._abandoned or self._finishing or not leads:
                    await self._finish()  # ended, or being settled: wait for that
                elif (read := await self._read_inline()) is not None:
                    index += 1  # the leader gets the chunk itself; its snapshot is for joiners
                    yield read
        finally:
            self._readers -= 1
            self._release()

    async def join(self) -> bool:
        """A streamed call is about to read: from now on the pump reads upstream. It first waits for the
        leader's own read under way, if any (a reader must not see a stream its leader's client cut);
        False when the stream was cut: the call is answered some other way."""
        self._share()
        while self._reading is not None and self._reading is not self._pump:
            await self._waiter().wait()
        return not self._abandoned

    async def _next(self, until: float | None) -> None:
        arrived = self._waiter()
        assert self._demand is not None
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
            if self._readers or self._wholes:
                self._share()
            if self._demand is not None:
                self._demand.set()
            self._release()
        await self.settled()

    def want_whole(self) -> None:
        """A call waits for the whole answer: keep reading until it stops waiting."""
        self._wholes += 1
        self._share()
        if self._demand is not None:
            self._demand.set()

    def unwant_whole(self) -> None:
        self._wholes -= 1
        self._release()

    def _release(self) -> None:
        """Close the stream when no one is left to read it."""
        if not (self._leader or self._readers or self._wholes or self._finishing):
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
        flight.go_live(live)

    def ended(self, live: LiveStream) -> None:
        """`live` ended: nothing is left to stop."""
        self._live.discard(live)

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
        """Stop every live stream (the Keel is closing) and wait for them to settle."""
        lives = list(self._live)
        for live in lives:
            live.close()
        await asyncio.gather(*(live.settled() for live in lives))
