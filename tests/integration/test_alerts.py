"""Budget alerts: logged and counted, POSTed to a real local webhook that is down for a while
(each alert arrives exactly once, in order), given up on and logged only after the configured
tries; and with budgets in Redis, each threshold reported by exactly one of two processes."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import REDIS_URL, fresh_pg_database
from prometheus_client import CollectorRegistry, generate_latest

from keel.budgets import AlertSender, Budgets, MemoryBudgetBackend, RedisBudgetBackend
from keel.budgets.budgets import Alert
from keel.budgets.pending_alerts import LEASE_S, PendingAlerts, pending_alerts
from keel.config import AlertsConfig, BudgetConfig, parse_config
from keel.cost import to_nanos
from keel.observability.store import RecordStore
from keel.pipeline import Call, Context
from keel.types import ChatRequest

THRESHOLDS = [0.25, 0.5, 0.75, 1.0]


def call() -> Call:
    cfg = parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}]})
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    return Call(request, cfg.models[0], [], Context(feature="faq"))


async def alerts(count: int) -> list[Alert]:
    """`count` real alerts: a feature budget spent past that many thresholds."""
    budgets = Budgets([BudgetConfig(scope="feature", limit_usd=1, alert_at=THRESHOLDS)], MemoryBudgetBackend())
    raised: list[Alert] = []
    while len(raised) < count:
        reservation = await budgets.reserve(call(), to_nanos(0.25))
        raised += await budgets.settle(reservation, to_nanos(0.25))
    return raised


DOWN_FOR_GOOD = 10**9


class Webhook:
    """A local webhook that answers 503 to its first `down_for` requests, then 200; it remembers
    what it took. (Counted in requests, not seconds: nothing here depends on the machine's speed.)"""

    def __init__(self) -> None:
        self.down_for = 0
        self.taken: list[dict[str, Any]] = []
        self.refused = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.refused < self.down_for:
            self.refused += 1
            return web.Response(status=503)
        self.taken.append(body)
        return web.Response(status=200)


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/alerts", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hook.url = f"http://127.0.0.1:{port}/alerts"
    yield hook
    await runner.cleanup()


class Waits(list[float]):
    """The sender's sleep between tries: records the wait asked for and lets the loop run once."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
async def sender_for(waits: Waits) -> AsyncIterator[Callable[..., AlertSender]]:
    made: list[AlertSender] = []

    def make(url: str | None, **settings: Any) -> AlertSender:
        sender = AlertSender(AlertsConfig(webhook_url=url, initial_backoff_s=0.1, **settings), sleep=waits)
        made.append(sender)
        return sender

    yield make
    for sender in made:
        await sender.stop(timeout_s=0)


async def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(500):  # 10 s
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def test_an_alert_reaches_a_webhook_that_was_down_for_a_while_exactly_once(
    webhook: Webhook, sender_for: Callable[..., AlertSender], waits: Waits
) -> None:
    webhook.down_for = 4
    sender = sender_for(webhook.url)
    await sender.start()
    [alert] = await alerts(1)
    sender.send(alert)
    await wait_for(lambda: sender.delivered == 1)
    await sender.stop(timeout_s=5)  # nothing more can arrive
    assert webhook.taken == [alert.payload()]
    assert webhook.refused == 4 and sender.retried == 4 and sender.lost == 0
    assert waits == [0.1, 0.2, 0.4, 0.8]  # exponential backoff from initial_backoff_s
    body = webhook.taken[0]
    assert (body["scope"], body["match"], body["window"], body["limit_usd"], body["threshold"]) == (
        "feature", "faq", "month", 1.0, 0.25)
    assert body["spent_usd"] == 0.25 and body["at"].endswith("+00:00")


async def test_alerts_queued_while_the_webhook_is_down_arrive_in_order(
    webhook: Webhook, sender_for: Callable[..., AlertSender]
) -> None:
    webhook.down_for = 3
    sender = sender_for(webhook.url)
    await sender.start()
    raised = await alerts(3)
    for alert in raised:
        sender.send(alert)
    await wait_for(lambda: sender.delivered == 3)
    assert [body["threshold"] for body in webhook.taken] == [0.25, 0.5, 0.75]


async def test_an_alert_is_given_up_after_max_attempts_and_logged_with_its_payload(
    webhook: Webhook, sender_for: Callable[..., AlertSender], caplog: pytest.LogCaptureFixture
) -> None:
    webhook.down_for = DOWN_FOR_GOOD
    sender = sender_for(webhook.url, max_attempts=3)
    await sender.start()
    [alert] = await alerts(1)
    with caplog.at_level(logging.INFO, logger="keel.budgets.alerts"):
        sender.send(alert)
        await wait_for(lambda: sender.lost == 1)
    assert webhook.refused == 3 and sender.retried == 2 and sender.delivered == 0
    [lost] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "failed 3 times, lastly with HTTP 503" in lost.getMessage() and alert.payload()["id"] in lost.getMessage()
    [warned] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "budget alert: feature 'faq' month budget" in warned.getMessage()


async def test_an_unreachable_webhook_is_retried_like_a_failing_one(sender_for: Callable[..., AlertSender]) -> None:
    sender = sender_for("http://127.0.0.1:1/alerts", max_attempts=2)
    await sender.start()
    [alert] = await alerts(1)
    sender.send(alert)
    await wait_for(lambda: sender.lost == 1)
    assert sender.retried == 1


def parked_retries() -> tuple[asyncio.Event, Callable[[float], Awaitable[None]]]:
    """A sender's `sleep` that parks its first retry until the sender stops, and the event set when it does."""
    retried = asyncio.Event()

    async def park(seconds: float) -> None:
        retried.set()
        await asyncio.Event().wait()

    return retried, park


async def test_stopping_logs_alerts_still_undelivered(
    webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    webhook.down_for = DOWN_FOR_GOOD
    retried, park = parked_retries()

    sender = AlertSender(AlertsConfig(webhook_url=webhook.url), sleep=park)
    await sender.start()
    raised = await alerts(2)
    for alert in raised:
        sender.send(alert)
    await asyncio.wait_for(retried.wait(), 5)
    with caplog.at_level(logging.ERROR, logger="keel.budgets.alerts"):
        await sender.stop(timeout_s=0)
    assert sender.lost == 2
    assert sum("the gateway stopped" in r.getMessage() for r in caplog.records) == 2


async def test_stopping_waits_for_alerts_being_delivered(
    webhook: Webhook, sender_for: Callable[..., AlertSender]
) -> None:
    webhook.down_for = 2
    sender = sender_for(webhook.url)
    await sender.start()
    for alert in await alerts(2):
        sender.send(alert)
    await sender.stop(timeout_s=5)
    assert len(webhook.taken) == 2 and sender.lost == 0


async def test_a_full_queue_loses_the_newest_alert_loudly() -> None:
    sender = AlertSender(AlertsConfig(webhook_url="http://127.0.0.1:1/alerts"), queue_size=1)
    raised = await alerts(2)
    sender.send(raised[0])  # not started: it waits in the queue
    sender.send(raised[1])
    assert sender.lost == 1
    await sender.stop(timeout_s=0)


async def test_without_a_webhook_alerts_are_logged_and_counted_for_prometheus(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = AlertSender(AlertsConfig())
    await sender.start()
    with caplog.at_level(logging.WARNING, logger="keel.budgets.alerts"):
        for alert in await alerts(2):
            sender.send(alert)
    assert len(caplog.records) == 2 and "at 25% of 1.0 USD" in caplog.records[0].getMessage()
    registry = CollectorRegistry()
    registry.register(sender)
    text = generate_latest(registry).decode()
    assert 'keel_budget_alerts_total{scope="feature",threshold="0.25",window="month"} 1.0' in text
    assert 'keel_budget_alert_deliveries_total{outcome="lost"} 0.0' in text
    await sender.stop()


# ---------------------------------------------------------------------------- two processes, one Redis


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


def spend(prefix: str, calls: int) -> list[float]:
    """One replica: `calls` concurrent calls of 0.01 USD each; the thresholds it reported."""
    return asyncio.run(_spend(prefix, calls))


async def _spend(prefix: str, calls: int) -> list[float]:
    rule = BudgetConfig(scope="feature", match="faq", limit_usd=1, alert_at=THRESHOLDS)
    budgets = Budgets([rule], RedisBudgetBackend(REDIS_URL, prefix))
    reported: list[float] = []

    async def one() -> None:
        reservation = await budgets.reserve(call(), to_nanos(0.01))
        reported.extend(alert.threshold.share for alert in await budgets.settle(reservation, to_nanos(0.01)))

    await asyncio.gather(*(one() for _ in range(calls)))
    await budgets.close()
    return reported


def test_each_threshold_is_reported_by_exactly_one_of_two_processes(prefix: str) -> None:
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        first, second = pool.starmap(spend, [(prefix, 50), (prefix, 50)])
    assert sorted(first + second) == THRESHOLDS  # 100 x 0.01 USD: exactly the limit, so 100% too


# ---------------------------------------------------------------------------- pending alerts outlive a restart


@pytest.fixture(scope="module")
def pg_alerts_database() -> Iterator[str]:
    with fresh_pg_database("keel_alerts") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The request log's database the pending alerts are kept in: a new SQLite file, or a PostgreSQL
    database of this module's own, emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/log.db"
    else:
        url = request.getfixturevalue("pg_alerts_database")
        store = RecordStore(url)
        store.migrate()
        with store.transaction("empty") as conn:
            conn.execute(pending_alerts.delete())
        store.close()
    return url


@pytest.fixture
def pending_for(log_url: str) -> Iterator[Callable[..., PendingAlerts]]:
    """`pending_for(**options)`: one sender's pending alerts over a store opened anew on the same
    database, as a restarted process has it."""
    opened: list[RecordStore] = []

    def make(**options: Any) -> PendingAlerts:
        store = RecordStore(log_url)
        store.migrate()
        opened.append(store)
        return PendingAlerts(store, **options)

    yield make
    for store in opened:
        store.close()


async def test_alerts_pending_at_a_stop_are_delivered_exactly_once_by_the_next_sender(
    webhook: Webhook, pending_for: Callable[..., PendingAlerts], caplog: pytest.LogCaptureFixture,
) -> None:
    webhook.down_for = DOWN_FOR_GOOD
    retried, park = parked_retries()

    first = AlertSender(AlertsConfig(webhook_url=webhook.url), sleep=park, pending=pending_for())
    await first.start()
    raised = await alerts(3)
    for alert in raised[:2]:
        first.send(alert)
    await asyncio.wait_for(retried.wait(), 5)
    with caplog.at_level(logging.WARNING, logger="keel.budgets.alerts"):
        await first.stop(timeout_s=0)
    assert (first.kept, first.lost, first.delivered) == (2, 0, 0)
    assert sum("kept for the next start" in r.getMessage() for r in caplog.records) == 2
    assert pending_for().count() == 2

    webhook.down_for = webhook.refused  # the webhook is back
    again = AlertSender(AlertsConfig(webhook_url=webhook.url), pending=pending_for())
    await again.start()
    again.send(raised[0])  # raised again while still pending (a budget in memory forgot it): not sent twice
    again.send(raised[2])
    await again.stop(timeout_s=10)  # waits for every queued alert
    assert [body["id"] for body in webhook.taken] == [raised[0].payload()["id"], raised[1].payload()["id"],
                                                       raised[2].payload()["id"]]
    assert webhook.taken[0] == raised[0].payload()  # the payload as it was raised, read back whole
    assert (again.delivered, again.lost, again.kept) == (3, 0, 0)
    assert pending_for().count() == 0

    third = AlertSender(AlertsConfig(webhook_url=webhook.url), pending=pending_for())
    await third.start()
    await third.stop(timeout_s=10)
    assert third.delivered == 0 and len(webhook.taken) == 3  # delivered ones are not sent again


async def test_the_alerts_of_a_sender_that_died_go_to_another_once_their_lease_lapses(
    webhook: Webhook, pending_for: Callable[..., PendingAlerts],
) -> None:
    now = [1_000_000.0]
    dead = AlertSender(AlertsConfig(webhook_url=webhook.url), pending=pending_for(clock=lambda: now[0]))
    [alert] = await alerts(1)
    dead.send(alert)  # kept, then the process dies: never started, never stopped
    watcher = pending_for(clock=lambda: now[0])
    await wait_for(lambda: watcher.count() == 1)

    early = AlertSender(AlertsConfig(webhook_url=webhook.url), pending=pending_for(clock=lambda: now[0]))
    await early.start()
    await early.stop(timeout_s=10)
    assert early.delivered == 0 and webhook.taken == []  # its lease runs: the sender may be alive

    now[0] += LEASE_S + 1
    late = AlertSender(AlertsConfig(webhook_url=webhook.url), pending=pending_for(clock=lambda: now[0]))
    await late.start()
    await late.stop(timeout_s=10)
    assert late.delivered == 1 and webhook.taken == [alert.payload()]
    assert watcher.count() == 0


async def test_a_keel_restarted_over_the_same_log_delivers_the_alert_its_last_run_left_pending(
    webhook: Webhook, tmp_path: Path,
) -> None:
    from keel import Keel

    webhook.down_for = DOWN_FOR_GOOD
    config = parse_config({
        "models": [{"name": "m", "deployments": [{"provider": "simulated", "price": {"input": 1000, "output": 1000}}]}],
        "budgets": [{"scope": "global", "window": "total", "limit_usd": 1, "alert_at": [0.000001]}],
        "alerts": {"webhook_url": webhook.url, "initial_backoff_s": 60},  # its retry waits past the stop
        "store": {"url": f"sqlite:///{tmp_path}/log.db", "spool_path": str(tmp_path / "spool.jsonl")},
    })
    first = Keel(config)
    await first.chat(model="m", messages=[{"role": "user", "content": "spend"}], max_tokens=5)
    await wait_for(lambda: webhook.refused == 1)  # raised, kept, tried once; the webhook is down
    await first.alerts.stop(timeout_s=0)
    await first.close()
    assert first.alerts.kept == 1 and first.alerts.lost == 0

    webhook.down_for = webhook.refused  # back up
    again = Keel(config)
    await again.start()  # delivers what the last run left
    await wait_for(lambda: again.alerts.delivered == 1)
    await again.close()
    [body] = webhook.taken
    assert (body["scope"], body["threshold"], body["reason"]) == ("global", 0.000001, "spent")
