"""Alerts (budgets', and drift's through `deliver`): logged, counted, and POSTed to a webhook until it
takes them.

`send` returns at once: the alert is logged (WARNING), counted, and queued; one background task
POSTs queued alerts in order, retrying each with exponential backoff (tenacity's: `initial_backoff_s`,
doubling, at most 5 minutes apart) up to `max_attempts` tries, so a webhook that is down for a
while (the defaults span about an hour) still gets every alert. Each payload has an `id` that is
the same for every try: a receiver that saw a try time out after taking it dedupes on that.
An alert dropped (queue full, tries used up, or still queued at shutdown) is logged at ERROR
with its payload, never silently.

With `pending` (`PendingAlerts`, the gateway's: the request-log database) an alert outlives the process:
kept when raised, forgotten when the webhook took it (or its tries were used up), and, when the sender
stops or dies first, delivered by the next sender to start over the same database, once.

Counts are exposed to Prometheus through `collect()`: register the sender in a registry
(`registry.register(sender)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import aiohttp
import orjson
from prometheus_client.core import CounterMetricFamily, Metric
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from keel.budgets.budgets import Alert
from keel.budgets.pending_alerts import PendingAlerts
from keel.config import AlertsConfig
from keel.observability.store import StoreError

log = logging.getLogger("keel.budgets.alerts")

MAX_BACKOFF_S = 300.0


class Deliverable(Protocol):
    """What the webhook is sent: a budget `Alert`, a drift alert. Its payload's `kind` (default
    "budget") names it in the log lines."""

    def payload(self) -> dict[str, Any]: ...


def _kind(alert: Deliverable) -> str:
    return str(alert.payload().get("kind", "budget"))


class KeptAlert:
    """An alert read back from the pending alerts: its payload as it was raised."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self._payload = payload

    def payload(self) -> dict[str, Any]:
        return self._payload


# A queued alert, and the write that keeps it (None: nothing to write, or it was read back already);
# the write says False when the same alert was pending already: then it is not sent twice.
Queued = tuple[Deliverable, "asyncio.Task[bool] | None"]


class AlertSender:
    def __init__(
        self, config: AlertsConfig, *, queue_size: int = 1000, timeout_s: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, pending: PendingAlerts | None = None,
    ) -> None:
        self.config = config
        self.pending = pending
        self.timeout_s = timeout_s  # per POST
        self._sleep = sleep  # between tries; tests pass one that does not wait
        self.raised: dict[tuple[str, str, str], int] = {}  # (scope, window, threshold) → alerts
        self.delivered = 0
        self.retried = 0
        self.lost = 0  # given up on (queue full, tries used up, pending at shutdown without `pending`)
        self.kept = 0  # left pending at shutdown, for the next start to deliver
        self._queue: asyncio.Queue[Queued] = asyncio.Queue(queue_size)
        self._writes: set[asyncio.Task[bool]] = set()
        self._ids: set[str] = set()  # ids of the alerts queued or being delivered here
        self._worker: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def send(self, alert: Alert) -> None:
        payload = alert.payload()
        log.warning(
            "budget alert: %s%s %s budget (%s) at %g%% of %s USD: %.6f USD spent%s",
            payload["scope"], f" '{payload['match']}'" if payload["match"] is not None else "",
            payload["window"], payload["period"], payload["threshold"] * 100, payload["limit_usd"],
            payload["spent_usd"], " (a call was refused)" if alert.refused else "",
        )
        label = (payload["scope"], payload["window"], f"{payload['threshold']:g}")
        self.raised[label] = self.raised.get(label, 0) + 1
        self.deliver(alert)

    def deliver(self, alert: Deliverable) -> None:
        """Queue `alert` for the webhook (nothing without one): the same retries and loss logging as budget
        alerts. The caller has logged and counted it."""
        if self.config.webhook_url is None:
            return
        alert_id = str(alert.payload().get("id"))
        if alert_id in self._ids:
            return  # raised again while queued here (a budget in memory that restarted): sent once
        if self._queue.full():
            self._lose(alert, f"the queue of {self._queue.maxsize} undelivered alerts is full")
            return
        write = None
        if self.pending is not None:  # kept from now on: the queue ahead of it may take an hour
            write = asyncio.create_task(self._keep(alert))
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)
        self._ids.add(alert_id)
        self._queue.put_nowait((alert, write))

    async def start(self) -> None:
        """Start delivering (nothing to do without a webhook), the alerts left pending first."""
        if self.config.webhook_url is not None and self._worker is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            if self.pending is not None:
                await self._claim()
                self._renewer = asyncio.create_task(self._renew_forever(), name="keel-alerts-lease")
            self._worker = asyncio.create_task(self._deliver_forever(), name="keel-budget-alerts")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Give queued alerts up to `timeout_s` to be delivered, then stop; what is left is kept for the
        next start (with `pending`) or logged as lost."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._worker is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._queue.join()), timeout_s)
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._writes:  # every alert raised is written before the rows are released
            await asyncio.gather(*self._writes, return_exceptions=True)
        while not self._queue.empty():
            alert, _ = self._queue.get_nowait()
            self._leave(alert)
        self._ids.clear()
        if self.pending is not None:
            try:
                await asyncio.to_thread(self.pending.release)
            except StoreError as exc:  # its leases lapse instead: the next start waits for that
                log.warning("pending alerts not released (%s); the next start takes them once their lease lapses",
                            exc)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _keep(self, alert: Deliverable) -> bool:
        """Write a raised alert to the pending alerts; False when it was pending already. If the database
        cannot be written, the alert is still delivered from memory (but would not outlive a restart)."""
        assert self.pending is not None
        try:
            return await asyncio.to_thread(self.pending.add, alert.payload())
        except StoreError as exc:
            log.warning("%s alert not kept for a restart (%s); delivering it from memory", _kind(alert), exc)
            return True

    async def _claim(self) -> None:
        """Queue the pending alerts no live sender holds (left by a stop, or by a sender that died)."""
        assert self.pending is not None
        try:
            payloads = await asyncio.to_thread(self.pending.claim)
        except StoreError as exc:
            log.warning("pending alerts not read (%s); trying again in %.0f s", exc, self.pending.lease_s / 3)
            return
        for payload in payloads:
            if str(payload.get("id")) in self._ids:
                continue  # its lease lapsed while it waited here (the database was out for a while)
            if self._queue.full():
                break  # left in the table, leased: taken again once the lease lapses
            log.info("%s alert %s left pending by an earlier run: delivering it", payload.get("kind", "budget"),
                     payload.get("id"))
            self._ids.add(str(payload.get("id")))
            self._queue.put_nowait((KeptAlert(payload), None))

    async def _renew_forever(self) -> None:
        """While this sender runs: its rows' leases renewed, and rows of senders that died taken over."""
        assert self.pending is not None
        while True:
            await asyncio.sleep(self.pending.lease_s / 3)
            try:
                await asyncio.to_thread(self.pending.renew)
            except StoreError as exc:
                log.warning("pending alerts' lease not renewed: %s", exc)
            await self._claim()

    async def _forget(self, alert: Deliverable) -> None:
        """Delivered or given up on: no sender is to send it again."""
        if self.pending is None:
            return
        try:
            await asyncio.to_thread(self.pending.done, str(alert.payload()["id"]))
        except StoreError as exc:
            log.warning("%s alert %s delivered but still marked pending (%s): it may be sent again after a "
                        "restart; the webhook dedupes on its id", _kind(alert), alert.payload().get("id"), exc)

    def _leave(self, alert: Deliverable) -> None:
        """The sender stops before the webhook took `alert`: kept for the next start, or lost."""
        if self.pending is None:
            self._lose(alert, "the gateway stopped before the webhook took it")
            return
        self.kept += 1
        log.warning("%s alert %s not delivered yet: kept for the next start", _kind(alert), alert.payload().get("id"))

    async def _deliver_forever(self) -> None:
        while True:
            alert, write = await self._queue.get()
            try:
                if write is not None and not await write:
                    continue  # pending already, queued from the table: sent once, from there
                await self._deliver(alert)
                await self._forget(alert)
            except asyncio.CancelledError:
                self._leave(alert)
                raise
            except Exception:  # a bug here must not end delivery of the alerts after it
                log.exception("%s alert delivery failed", _kind(alert))
                self._lose(alert, "an unexpected error")
                await self._forget(alert)
            finally:
                self._ids.discard(str(alert.payload().get("id")))
                self._queue.task_done()

    async def _deliver(self, alert: Deliverable) -> None:
        assert self._session is not None and self.config.webhook_url is not None
        session, url, body = self._session, self.config.webhook_url, orjson.dumps(alert.payload())
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.max_attempts),
            wait=wait_exponential(multiplier=self.config.initial_backoff_s, max=MAX_BACKOFF_S),
            retry=retry_if_exception_type((WebhookRefused, aiohttp.ClientError, TimeoutError)),
            before_sleep=self._retrying,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                        if not 200 <= response.status < 300:
                            raise WebhookRefused(f"HTTP {response.status}")
        except (WebhookRefused, aiohttp.ClientError, TimeoutError) as exc:
            self._lose(alert, f"the webhook failed {self.config.max_attempts} times, lastly with {_problem(exc)}")
            return
        self.delivered += 1

    def _retrying(self, state: RetryCallState) -> None:
        self.retried += 1
        error = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.info(
            "alert webhook failed (%s); try %d in %.1f s",
            _problem(error) if error is not None else "?", state.attempt_number + 1, wait,
        )

    def _lose(self, alert: Deliverable, why: str) -> None:
        self.lost += 1
        log.error("%s alert not delivered (%s): %s", _kind(alert), why, orjson.dumps(alert.payload()).decode())

    def collect(self) -> Iterator[Metric]:
        raised = CounterMetricFamily(
            "keel_budget_alerts", "Budget alerts raised", labels=["scope", "window", "threshold"]
        )
        for labels, value in self.raised.items():
            raised.add_metric(list(labels), value)
        yield raised
        outcomes = CounterMetricFamily(
            "keel_budget_alert_deliveries", "Webhook outcomes of budget alerts", labels=["outcome"]
        )
        outcomes.add_metric(["delivered"], self.delivered)
        outcomes.add_metric(["retried"], self.retried)
        outcomes.add_metric(["lost"], self.lost)
        outcomes.add_metric(["kept"], self.kept)
        yield outcomes

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class WebhookRefused(Exception):
    """The webhook answered, but not with a 2xx: worth another try."""


def _problem(error: BaseException) -> str:
    if isinstance(error, WebhookRefused):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
