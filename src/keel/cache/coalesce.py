"""Concurrent identical calls share one upstream call.

The first call of a key leads: it calls upstream. Calls of the same key that arrive meanwhile wait
for the leader's answer to be stored, then are served from it. A leader that fails fails its waiters
with the same error; a leader whose answer is not stored (cut short, filtered, no-store) releases
them to call upstream themselves.
"""

from __future__ import annotations

import asyncio

from keel.cache.entry import CachedAnswer


class Coalescer:
    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[CachedAnswer | None]] = {}

    def joined(self, key: str) -> asyncio.Future[CachedAnswer | None] | None:
        """The leader's flight of `key`, when a call of that key is under way."""
        return self._flights.get(key)

    def lead(self, key: str) -> asyncio.Future[CachedAnswer | None]:
        flight: asyncio.Future[CachedAnswer | None] = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        return flight

    def land(self, key: str, answer: CachedAnswer | BaseException | None) -> None:
        """The leader is done: waiters get its stored answer, its error, or None (call yourselves)."""
        flight = self._flights.pop(key, None)
        if flight is None or flight.done():
            return
        if isinstance(answer, BaseException):
            flight.set_exception(answer)
            flight.exception()  # marked retrieved: a leader without waiters is not an unhandled error
        else:
            flight.set_result(answer)
