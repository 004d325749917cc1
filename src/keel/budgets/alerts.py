"""Alerts (budgets', and drift's through `deliver`): logged, counted, and POSTed to a webhook until it
takes them.

`send` returns at once: the alert is logged (WARNING), counted, and queued; one background task
POSTs queued alerts in order, retrying each with exponential backoff (tenacity's: `initial_backoff_s`,
doubling, at most 5 minutes apart) up to `max_attempts` tries, so a webhook that is down for a
while (the defaults span about an hour) still gets every alert. Each payload has an `id` that is
the same for every try: a receiver that saw a try time out after taking it dedupes on that.
An alert dropped (queue full, tries used up, or still queued at shutdown) is logged at ERROR
with its payload, never silently.

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
from keel.config import AlertsConfig

log = logging.getLogger("keel.budgets.alerts")

MAX_BACKOFF_S = 300.0


class Deliverable(Protocol):
    """What the webhook is sent: a budget `Alert`, a drift alert. Its payload's `kind` (default
    "budget") names it in the log lines."""

    def payload(self) -> dict[str, Any]: ...


def _kind(alert: Deliverable) -> str:
    return str(alert.payload().get("kind", "budget"))


class AlertSender:
    def __init__(
        self, config: AlertsConfig, *, queue_size: int = 1000, timeout_s: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.timeout_s = timeout_s  # per POST
        self._sleep = sleep  # between tries; tests pass one that does not wait
        self.raised: dict[tuple[str, str, str], int] = {}  # (scope, window, threshold) → alerts
        self.delivered = 0
        self.retried = 0
        self.lost = 0  # given up on (queue full, tries used up, pending at shutdown)
        self._queue: asyncio.Queue[Deliverable] = asyncio.Queue(queue_size)
        self._worker: asyncio.Task[None] | None = None
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
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self._lose(alert, f"the queue of {self._queue.maxsize} undelivered alerts is full")

    async def start(self) -> None:
        """Start delivering (nothing to do without a webhook)."""
        if self.config.webhook_url is not None and self._worker is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            self._worker = asyncio.create_task(self._deliver_forever(), name="keel-budget-alerts")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Give queued alerts up to `timeout_s` to be delivered, then stop; what is left is logged."""
        if self._worker is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._queue.join()), timeout_s)
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            self._lose(self._queue.get_nowait(), "the gateway stopped before the webhook took it")
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _deliver_forever(self) -> None:
        while True:
            alert = await self._queue.get()
            try:
                await self._deliver(alert)
            except asyncio.CancelledError:
                self._lose(alert, "the gateway stopped before the webhook took it")
                raise
            except Exception:  # a bug here must not end delivery of the alerts after it
                log.exception("%s alert delivery failed", _kind(alert))
                self._lose(alert, "an unexpected error")
            finally:
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
        yield outcomes

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class WebhookRefused(Exception):
    """The webhook answered, but not with a 2xx: worth another try."""


def _problem(error: BaseException) -> str:
    if isinstance(error, WebhookRefused):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
