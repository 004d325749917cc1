"""Overload protection: at most `limit` calls in flight at once through one gate (a deployment, an API key,
a tenant),
and a short, bounded line of calls waiting for a slot: each waits at most `max_wait_s` (never past its
deadline), at most `max_waiting` wait at once, and the rest are refused at once with 503 `overloaded`
and a Retry-After. A slot freed goes to the oldest waiter, so a busy gate is fair.

Counted in this process: with several workers or replicas behind one port, each has these limits
(docs/reliability.md). The event loop is the only lock: nothing here awaits between a check and its change.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from keel.config import ConcurrencyConfig
from keel.errors import ConcurrencyExceeded
from keel.wording import counted


class Slot:
    """A place held in a gate; `release` (once; later calls do nothing) gives it to the next waiter."""

    __slots__ = ("_gate",)

    def __init__(self, gate: ConcurrencyLimit) -> None:
        self._gate: ConcurrencyLimit | None = gate

    def release(self, *_: object) -> None:  # also a reply's finaliser, which is passed the reply
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release()


class ConcurrencyLimit:
    """One gate: `limit` calls at once, up to `settings.max_waiting` waiting, each for `settings.max_wait_s`."""

    def __init__(
        self, limit: int, settings: ConcurrencyConfig, *, scope: str, name: str,
        on_idle: Callable[[ConcurrencyLimit], None] | None = None,
    ) -> None:
        self.limit = limit
        self.on_idle = on_idle  # told when the last call left and nobody waits
        self.settings = settings
        self.scope = scope  # "deployment", "key" or "tenant": what the error message and the metrics call it
        self.name = name
        self.in_flight = 0
        self.shed = 0  # calls refused: no slot within their wait, or too many waiting already
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and not self._waiters

    async def enter(self, remaining_s: float | None) -> Slot:
        """A slot, at once or within min(max_wait_s, `remaining_s`: what is left of the call's deadline);
        else `ConcurrencyExceeded`."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return Slot(self)
        wait = self.settings.max_wait_s if remaining_s is None else min(self.settings.max_wait_s, remaining_s)
        if wait <= 0 or len(self._waiters) >= self.settings.max_waiting:
            raise self._refused(wait > 0)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except TimeoutError:
            if not (waiter.done() and not waiter.cancelled()):
                raise self._refused(False) from None
            # handed a slot just as the wait ran out: it is this call's
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, but the caller went away: pass it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return Slot(self)

    def release(self) -> None:
        """A call left: its slot goes to the oldest waiter still waiting, else it is free."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # in_flight unchanged: the slot changes hands
                return
        self.in_flight -= 1
        if self.in_flight == 0 and self.on_idle is not None:
            self.on_idle(self)

    def _refused(self, line_full: bool) -> ConcurrencyExceeded:
        self.shed += 1
        why = (f"{counted(self.waiting, 'call')} already waiting for a slot" if line_full
               else f"no slot freed within {self.settings.max_wait_s:g} s (limits.concurrency.max_wait_s) or the "
                    "call's deadline")
        what = {"deployment": f"deployment '{self.name}'", "tenant": f"tenant '{self.name}'"}.get(
            self.scope, "this API key")
        limit = "its limit (limits.concurrency.per_tenant)" if self.scope == "tenant" else "its max_concurrency"
        return ConcurrencyExceeded(
            f"{what} has {counted(self.limit, 'call')} in flight, {limit}, and {why}; try again in "
            f"{self.settings.retry_after_s:g} s, or send fewer calls at once",
            retry_after=self.settings.retry_after_s, scope=self.scope,
            deployment=self.name if self.scope == "deployment" else None,
        )


class CallerGates:
    """The gates of one kind of caller (API keys, tenants), made on a caller's first call and dropped once
    idle (so a million keys seen once cost nothing)."""

    def __init__(self, settings: ConcurrencyConfig, scope: str) -> None:
        self.settings = settings
        self.scope = scope
        self.gates: dict[str, ConcurrencyLimit] = {}
        self.shed = 0  # calls these gates refused

    async def enter(self, name: str, limit: int, remaining_s: float | None) -> Slot:
        gate = self.gates.get(name)
        if gate is None or gate.limit != limit:  # a caller whose limit changed starts a new gate
            gate = self.gates[name] = ConcurrencyLimit(limit, self.settings, scope=self.scope, name=name,
                                                       on_idle=self._drop)
        try:
            return await gate.enter(remaining_s)
        except ConcurrencyExceeded:
            self.shed += 1
            if gate.idle:
                self._drop(gate)
            raise

    def _drop(self, gate: ConcurrencyLimit) -> None:
        if self.gates.get(gate.name) is gate:
            del self.gates[gate.name]


class CallerConcurrency:
    """The gates of the API keys and of the tenants, and the metrics of every gate: keys and tenants
    summed (one series per key would be unbounded), deployments each."""

    def __init__(self, settings: ConcurrencyConfig) -> None:
        self.settings = settings
        self.keys = CallerGates(settings, "key")
        self.tenants = CallerGates(settings, "tenant")
        self.deployments: list[ConcurrencyLimit] = []  # watched for the metrics only
        self.keys_limited = False  # the concurrency stage runs: the keys' figures are shown

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("keel_concurrency_in_flight", "Calls holding a concurrency slot now",
                                      labels=["scope", "limit"])
        waiting = GaugeMetricFamily("keel_concurrency_waiting", "Calls waiting for a concurrency slot now",
                                    labels=["scope", "limit"])
        shed = CounterMetricFamily("keel_concurrency_shed", "Calls refused with 503 overloaded by a concurrency limit",
                                   labels=["scope", "limit"])
        callers = [(self.keys, "per_key")] if self.keys_limited else []
        if self.settings.per_tenant is not None:
            callers.append((self.tenants, "per_tenant"))
        for kind, limit in callers:  # summed over the callers of the kind
            gates = list(kind.gates.values())
            in_flight.add_metric([kind.scope, limit], sum(g.in_flight for g in gates))
            waiting.add_metric([kind.scope, limit], sum(g.waiting for g in gates))
            shed.add_metric([kind.scope, limit], kind.shed)
        for gate in self.deployments:
            in_flight.add_metric(["deployment", gate.name], gate.in_flight)
            waiting.add_metric(["deployment", gate.name], gate.waiting)
            shed.add_metric(["deployment", gate.name], gate.shed)
        yield in_flight
        yield waiting
        yield shed

    def describe(self) -> Iterator[Metric]:
        return self.collect()
