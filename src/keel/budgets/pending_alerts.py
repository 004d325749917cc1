"""Alerts not yet taken by the webhook, kept in the request-log database (table `pending_alerts`, revision
0009) so that a restart delivers them instead of losing them.

Why there, not in the budget backend: the request log is always a durable database (a SQLite file by
default, PostgreSQL when replicas share one), migrated with the rest of Keel's schema; the budget
backend may be in memory, and then an outbox in it would die with the process it is meant to outlive.

Exactly once across restarts and replicas: a row is written when the alert is raised (its payload's
`id` is the key, so an alert raised again while still pending is not queued twice), claimed by one
sender (`owner`, with a lease that sender renews while it runs), and deleted when the webhook took
it or its tries are used up. A sender that stops releases its rows (lease 0), so the next start takes
them at once; a sender that dies stops renewing, and its rows are taken by another sender (or the
next start) once their lease has lapsed. Blocking (SQLAlchemy Core): the sender calls it off the
event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import JSON, Column, Float, Index, String, Table, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from keel.ids import random_hex
from keel.observability.store import RecordStore, metadata

# On the request log's metadata: one schema, which the migrations are checked against.
pending_alerts = Table(
    "pending_alerts",
    metadata,
    Column("id", String, primary_key=True),  # the payload's id: the same for every try
    Column("payload", JSON(none_as_null=True), nullable=False),  # the webhook's JSON body
    Column("raised_at", Float, nullable=False),  # unix seconds: alerts are delivered oldest first
    Column("owner", String, nullable=False),  # the sender delivering it
    Column("lease_until", Float, nullable=False),  # unix seconds; past it, any sender may take the row
    Index("ix_pending_alerts_lease_until", "lease_until"),
)

LEASE_S = 60.0  # a sender renews its rows every third of it


class PendingAlerts:
    """One sender's view of the pending alerts in `store` (its schema migrated)."""

    def __init__(self, store: RecordStore, *, lease_s: float = LEASE_S, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.lease_s = lease_s
        self.clock = clock
        self.owner = "sender_" + random_hex(8)

    def add(self, payload: Mapping[str, Any]) -> bool:
        """Keep an alert raised here, owned by this sender; False when one with its id is pending already
        (raised again before the first was delivered): then it is not to be sent a second time."""
        now = self.clock()
        row = {"id": str(payload["id"]), "payload": dict(payload), "raised_at": now, "owner": self.owner,
               "lease_until": now + self.lease_s}
        dialect = postgresql if self.store.dialect == "postgresql" else sqlite
        with self.store.transaction("keep a pending alert in") as conn:
            inserted = conn.execute(dialect.insert(pending_alerts).on_conflict_do_nothing(), [row]).rowcount
        return bool(inserted)

    def claim(self) -> list[dict[str, Any]]:
        """Take the rows no live sender holds (released, or their lease lapsed), oldest first: their payloads."""
        now = self.clock()
        table = pending_alerts
        with self.store.transaction("claim pending alerts in") as conn:
            # One UPDATE takes each row for one sender only, however many claim at once.
            taken = conn.execute(
                update(table).where(table.c.lease_until <= now)
                .values(owner=self.owner, lease_until=now + self.lease_s)
                .returning(table.c.id)
            ).scalars().all()
            if not taken:
                return []
            rows = conn.execute(
                select(table.c.payload).where(table.c.id.in_(taken), table.c.owner == self.owner)
                .order_by(table.c.raised_at, table.c.id)
            ).scalars().all()
        return [dict(payload) for payload in rows]

    def renew(self) -> None:
        """Extend the lease of this sender's rows: it is alive and still delivering them."""
        table = pending_alerts
        with self.store.transaction("renew pending alerts in") as conn:
            conn.execute(update(table).where(table.c.owner == self.owner)
                         .values(lease_until=self.clock() + self.lease_s))

    def done(self, alert_id: str) -> None:
        """The alert was taken by the webhook, or given up on (and logged): no sender is to send it again."""
        table = pending_alerts
        with self.store.transaction("forget a delivered alert in") as conn:
            conn.execute(delete(table).where(table.c.id == alert_id, table.c.owner == self.owner))

    def release(self) -> None:
        """This sender stops: its rows are left for the next sender to take at once."""
        table = pending_alerts
        with self.store.transaction("release pending alerts in") as conn:
            conn.execute(update(table).where(table.c.owner == self.owner).values(lease_until=0.0))

    def count(self) -> int:
        """Rows pending, whoever holds them (tests and `/metrics`)."""
        with self.store.connection() as conn:
            return len(conn.execute(select(pending_alerts.c.id)).all())
