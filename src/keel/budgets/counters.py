"""A budget counter (one scope value, one window period) and what its stores must do atomically.

A counter holds whole nano-dollars: `spent` (settled costs), `reserved` (worst cases of calls in
flight, each hold with an expiry so a crashed replica's holds lapse), and one marker per alert
threshold already reported this period, so each threshold is reported exactly once however many
replicas share the counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, unquote

from keel.budgets.windows import Period
from keel.config import BudgetConfig, BudgetScope
from keel.cost.money import Nanos


@dataclass(frozen=True, slots=True)
class Threshold:
    """A share of one rule's limit; reaching it raises one alert per period."""

    rule: BudgetConfig
    share: float
    nanos: Nanos  # spent at or above this raises the alert
    marker: str  # its name inside the counter: the rule's limit and the share

    @property
    def is_cap(self) -> bool:
        return self.share >= 1.0


@dataclass(frozen=True, slots=True)
class Counter:
    key: str
    scope: BudgetScope
    value: str | None  # the key id, user or feature counted; None for global
    period: Period
    limit: Nanos  # the lowest limit among the rules counting here
    binding: BudgetConfig  # the rule with that limit: named in refusals
    thresholds: tuple[Threshold, ...]
    expires_at: int | None  # Unix seconds when the store may drop it (its window is over); None: never

    @property
    def cap_marker(self) -> str:
        """The binding rule's 100% threshold: a refusal reports it (if spending has not yet) when the
        call would not fit even with no other call in flight."""
        return next((t.marker for t in self.thresholds if t.rule is self.binding and t.is_cap), "")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reservation did not fit: the first full counter, as the store saw it."""

    index: int  # into the counters passed to `reserve`
    spent: Nanos
    reserved: Nanos
    alert: bool  # the first report of the 100% threshold this period: spent + amount alone is over the limit


@dataclass(frozen=True, slots=True)
class Crossing:
    """A threshold that a settlement reached first."""

    counter: int  # index into the counters passed to `settle`
    threshold: int  # index into that counter's thresholds
    spent: Nanos  # the counter's spent right after the settlement


class BudgetBackend(Protocol):
    """Where counters live. Every method is atomic across all the counters it is given."""

    prefix: str  # of every key it holds
    shared: bool  # True when other processes see the same counters

    async def reserve(
        self, counters: list[Counter], reservation: str, amount: Nanos, now: float, hold_until: float
    ) -> Refusal | None:
        """Drop lapsed holds; then hold `amount` on every counter if spent + reserved + amount fits
        each limit, else on none and say which did not fit."""

    async def settle(self, counters: list[Counter], reservation: str, actual: Nanos, now: float) -> list[Crossing]:
        """Release the reservation's holds (if they have not lapsed), add `actual` to spent, and
        report the thresholds reached for the first time."""

    async def snapshot(self, keys: list[str], now: float) -> list[tuple[Nanos, Nanos]]:
        """(spent, reserved) of each key, lapsed holds dropped; (0, 0) for a key never charged."""

    async def scan(self, pattern: str) -> list[str]:
        """Counter keys matching a glob pattern (`*` for the scope value)."""

    async def rules(self) -> list[tuple[str, str]]:
        """Rules added through the admin API, as (id, JSON), oldest first."""

    async def add_rule(self, rule_json: str) -> str:
        """Store a rule; return its id."""

    async def remove_rule(self, rule_id: str) -> bool:
        """Delete a stored rule; False when it was already gone."""

    async def close(self) -> None: ...


def counter_key(prefix: str, scope: BudgetScope, value: str | None, period: Period) -> str:
    """`keel:budget:feature:faq:month:2026-11`; scope values are percent-encoded (no `:` or `*`)."""
    who = scope if value is None else f"{scope}:{quote(value, safe='')}"
    return f"{prefix}:{who}:{period.window}:{period.label}"


def value_of(key: str, prefix: str, scope: BudgetScope) -> str | None:
    """The scope value a counter key was made for (the inverse of `counter_key`)."""
    if scope == "global":
        return None
    return unquote(key[len(prefix) + len(scope) + 2:].split(":", 1)[0])
