"""Spend caps: the counters a call is charged to, its worst case held on all of them at once
before it runs, and its actual cost settled after.

Rules come from keel.yaml (`budgets:`) and from the admin API; the latter live in the backend,
so every replica sharing it applies them (each replica re-reads them every few seconds). A rule
with no `match` gives every key, user or feature its own counter. Several rules counting the
same thing in the same window share one counter; the lowest limit binds. A call by a virtual key
with budgets of its own is also charged to them, as rules of scope `key` for that key
(`key_budgets`): on the same counter as any other rule for that key and window.

Race-free by construction: `reserve` adds the worst case to `reserved` on every counter, or on
none, in one atomic step of the backend, so concurrent calls (on any replica) can never together
pass a limit with their worst cases; `settle` moves the call to `spent` at its actual cost. A
hold that is never settled (the process died) lapses after `reservation_ttl_s`. If an actual cost
exceeds its worst case (an estimate was low), spent can pass the limit by that difference: the
counter always equals the sum of the costs settled into it. Holds lapse by the replicas' clocks:
keep them in step (NTP).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from keel.budgets.backends import MemoryBudgetBackend, RedisBudgetBackend
from keel.budgets.counters import BudgetBackend, Counter, Refusal, Threshold, counter_key, value_of
from keel.budgets.key_budgets import InvalidKeyBudget, KeyBudgetRules, KeySource
from keel.budgets.windows import Period, period_at
from keel.config import BudgetConfig, BudgetWindow, ConfigError
from keel.cost.money import Nanos, to_nanos, to_usd
from keel.errors import BudgetExceeded, KeysUnavailable
from keel.ids import random_hex
from keel.observability.store import StoreError

if TYPE_CHECKING:
    from keel.auth.keys import VirtualKey
    from keel.config import KeelConfig
    from keel.pipeline import Call, Context

log = logging.getLogger("keel.budgets")

DAY_S = 86_400


@dataclass(frozen=True, slots=True)
class Alert:
    """A threshold of a budget reached (or its cap hit by a refused call), reported once."""

    counter: Counter
    threshold: Threshold
    spent: Nanos
    at: float  # Unix time
    refused: bool = False  # raised by a call the cap refused, before spending reached it

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON body. `id` is the same for every delivery of one alert: dedupe on it."""
        counter, rule = self.counter, self.threshold.rule
        return {
            "id": f"{counter.key}:{self.threshold.marker}",
            "scope": counter.scope,
            "match": counter.value,
            "window": counter.period.window,
            "period": counter.period.label,
            "limit_usd": rule.limit_usd,
            "spent_usd": to_usd(self.spent),
            "threshold": self.threshold.share,
            "reason": "refused" if self.refused else "spent",
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(),
        }


@dataclass(slots=True)
class Reservation:
    id: str
    amount: Nanos
    counters: list[Counter]  # as they were when reserved: a call is charged to the period it started in
    held: bool  # False when nothing was held (no counter applies, or a free call)
    settled: bool = False


@dataclass(frozen=True, slots=True)
class RuleEntry:
    index: int  # position in `Budgets.rules()`: the admin API's handle
    source: Literal["config", "admin"]
    rule: BudgetConfig
    id: str | None = None  # the backend's id of an admin rule


@dataclass(slots=True)
class _AdminRules:
    entries: list[tuple[str, BudgetConfig]] = field(default_factory=list)
    loaded_at: float = -math.inf  # time.monotonic()


class Budgets:
    def __init__(
        self,
        rules: Sequence[BudgetConfig],
        backend: BudgetBackend,
        *,
        clock: Callable[[], float] = time.time,
        reservation_ttl_s: float = 900.0,
        rules_refresh_s: float = 5.0,
    ) -> None:
        self.config_rules = list(rules)
        self.backend = backend
        self.clock = clock  # Unix time: picks the window period, times holds out
        self.reservation_ttl_s = reservation_ttl_s  # at least; a model's timeout_s + 60 s when longer
        self.rules_refresh_s = rules_refresh_s
        self._admin = _AdminRules()
        self._refresh_lock = asyncio.Lock()
        self._periods: dict[str, Period] = {}
        self._built: dict[str, tuple[tuple[BudgetConfig, ...], Counter]] = {}
        self._key_rules = KeyBudgetRules()
        self.keys: KeySource | None = None  # whose own budgets `status` shows; None: none

    @classmethod
    def from_config(cls, config: KeelConfig, **options: Any) -> Budgets:
        """keel.yaml's budgets, in Redis when `state.redis_url` is set, else in this process."""
        url, prefix = config.state.redis_url, f"{config.state.key_prefix}:budget"
        backend: BudgetBackend = RedisBudgetBackend(url, prefix) if url else MemoryBudgetBackend(prefix)
        return cls(config.budgets, backend, **options)

    # ------------------------------------------------------------------ the call path

    async def reserve(self, call: Call, amount: Nanos | Callable[[Call], Nanos]) -> Reservation:
        """Hold `amount` on every counter the call is charged to, or raise `BudgetExceeded`.
        `amount` may be a function of the call (`CostMeter.worst_case`): it then runs only when
        some counter applies."""
        now = self.clock()
        counters = self.counters(call.ctx, await self.rules_in_force(), now)
        if callable(amount):
            amount = amount(call) if counters else 0
        reservation = Reservation(random_hex(8), amount, counters, held=bool(counters) and amount > 0)
        if not reservation.held:
            return reservation
        hold_until = now + max(self.reservation_ttl_s, call.model.timeout_s + 60)
        refusal = await self.backend.reserve(counters, reservation.id, amount, now, hold_until)
        if refusal is None:
            return reservation
        counter = counters[refusal.index]
        error = _exceeded(counter, refusal, amount, now)
        if refusal.alert:
            cap = next(t for t in counter.thresholds if t.marker == counter.cap_marker)
            error.alerts.append(Alert(counter, cap, refusal.spent, now, refused=True))
        raise error

    async def settle(self, reservation: Reservation, actual: Nanos) -> list[Alert]:
        """Charge the actual cost and release the rest of the hold; the alerts now due (once each).
        Settling twice does nothing the second time."""
        if reservation.settled or not reservation.counters or (actual <= 0 and not reservation.held):
            reservation.settled = True
            return []
        reservation.settled = True
        now = self.clock()
        crossings = await self.backend.settle(reservation.counters, reservation.id, actual, now)
        reached = [(reservation.counters[c.counter], c) for c in crossings]
        return [Alert(counter, counter.thresholds[c.threshold], c.spent, now) for counter, c in reached]

    def counters(self, ctx: Context, rules: Sequence[BudgetConfig], now: float) -> list[Counter]:
        """The counters a call with this context is charged to, at Unix time `now`: those of
        `rules`, and those of its key's own budgets."""
        grouped: dict[str, tuple[str | None, Period, list[BudgetConfig]]] = {}
        own = self._key_rules.of(ctx.key)
        for rule in [*rules, *own] if own else rules:
            value = _scope_value(rule, ctx)
            if rule.scope != "global" and value is None:
                continue
            period = self._period(rule.window, now)
            key = counter_key(self.backend.prefix, rule.scope, value, period)
            grouped.setdefault(key, (value, period, []))[2].append(rule)
        return [self._counter(key, value, period, group) for key, (value, period, group) in grouped.items()]

    def _period(self, window: BudgetWindow, now: float) -> Period:
        """`period_at`, remembered while `now` stays in it (a call's hot path)."""
        known = self._periods.get(window)
        if known is None or not known.holds(now):
            known = self._periods[window] = period_at(window, now)
        return known

    def _counter(self, key: str, value: str | None, period: Period, rules: list[BudgetConfig]) -> Counter:
        """The counter of a key for these rules; built once per key and rule set (a call's hot path)."""
        known = self._built.get(key)
        if known is not None and known[0] == tuple(rules):  # the same rule objects: compared by identity first
            return known[1]
        counter = self._build_counter(key, value, period, rules)
        if len(self._built) > 10_000:  # keys of past periods and of many users: forget them now and then
            self._built.clear()
        self._built[key] = (tuple(rules), counter)
        return counter

    def _build_counter(self, key: str, value: str | None, period: Period, rules: list[BudgetConfig]) -> Counter:
        binding = min(rules, key=lambda r: r.limit_usd)
        thresholds = tuple(
            Threshold(rule, share, math.ceil(Decimal(str(share)) * to_nanos(rule.limit_usd)),
                      f"a:{to_nanos(rule.limit_usd)}:{share:g}")
            for rule in rules for share in sorted(set(rule.alert_at))
        )
        expires_at = None
        if period.resets_at is not None:  # kept a while after its window, for holds and late reports
            expires_at = int(period.resets_at.timestamp() + max(DAY_S, 2 * self.reservation_ttl_s))
        return Counter(key, binding.scope, value, period, to_nanos(binding.limit_usd), binding, thresholds, expires_at)

    # ------------------------------------------------------------------ rules (admin API)

    async def rules(self) -> list[RuleEntry]:
        """keel.yaml's rules, then the admin API's, freshly read from the backend."""
        await self.rules_in_force(fresh=True)
        entries = [RuleEntry(i, "config", rule) for i, rule in enumerate(self.config_rules)]
        offset = len(entries)
        return entries + [
            RuleEntry(offset + i, "admin", rule, rule_id) for i, (rule_id, rule) in enumerate(self._admin.entries)
        ]

    async def add_rule(self, rule: BudgetConfig) -> RuleEntry:
        rule_id = await self.backend.add_rule(rule.model_dump_json())
        entries = await self.rules()
        return next(e for e in entries if e.id == rule_id)

    async def remove_rule(self, index: int) -> RuleEntry:
        """Delete an admin rule by its index in `rules()`; `LookupError` when there is none,
        `PermissionError` for a keel.yaml rule (edit the file instead)."""
        entries = await self.rules()
        if not 0 <= index < len(entries):
            raise LookupError(f"there is no budget rule {index}; GET /admin/budgets lists {len(entries)}")
        entry = entries[index]
        if entry.source == "config" or entry.id is None:
            raise PermissionError(
                f"budget rule {index} comes from keel.yaml; remove it there and restart the gateway "
                "(rules added with POST /admin/budgets can be changed while it runs)"
            )
        await self.backend.remove_rule(entry.id)
        await self.rules_in_force(fresh=True)
        return entry

    async def status(self) -> list[dict[str, Any]]:
        """Each rule with its counters in the current period: spent, reserved, remaining (USD);
        then each usable key's own budgets (`source: key`, `id`: the key's), when `keys` is set."""
        now = self.clock()
        shown: list[tuple[dict[str, Any], BudgetConfig, list[str]]] = []
        for entry in await self.rules():
            rule = entry.rule
            period = period_at(rule.window, now)
            if rule.scope == "global" or rule.match is not None:
                keys = [counter_key(self.backend.prefix, rule.scope, rule.match, period)]
            else:
                pattern = f"{self.backend.prefix}:{rule.scope}:*:{period.window}:{period.label}"
                keys = sorted(await self.backend.scan(pattern))
            shown.append(({"index": entry.index, "source": entry.source, "id": entry.id}, rule, keys))
        for key in await self._keys_with_budgets(now):
            try:
                own = self._key_rules.of(key)
            except InvalidKeyBudget as exc:  # its calls are refused; the view still shows the rest
                log.warning("%s", exc.message)
                continue
            for rule in own:
                counter = counter_key(self.backend.prefix, "key", key.id, period_at(rule.window, now))
                shown.append(({"index": None, "source": "key", "id": key.id, "tenant": key.tenant}, rule, [counter]))
        counts = iter(await self.backend.snapshot([k for _, _, keys in shown for k in keys], now))
        return [
            {**about, "rule": rule.model_dump(),
             "counters": [self._shown_counter(rule, key, next(counts), now) for key in keys]}
            for about, rule, keys in shown
        ]

    def _shown_counter(self, rule: BudgetConfig, key: str, count: tuple[Nanos, Nanos], now: float) -> dict[str, Any]:
        period, (spent, reserved) = period_at(rule.window, now), count
        return {
            "key": key, "value": value_of(key, self.backend.prefix, rule.scope), "period": period.label,
            "resets_at": period.resets_at.isoformat() if period.resets_at else None,
            "spent_usd": to_usd(spent), "reserved_usd": to_usd(reserved),
            "remaining_usd": to_usd(max(0, to_nanos(rule.limit_usd) - spent - reserved)),
        }

    async def _keys_with_budgets(self, now: float) -> list[VirtualKey]:
        """The usable keys that have budgets of their own."""
        if self.keys is None:
            return []
        try:
            keys = await asyncio.to_thread(self.keys.list)
        except StoreError as exc:
            raise KeysUnavailable(
                f"The budgets of keys cannot be listed: the key store failed ({exc}). Try again in a moment."
            ) from None
        return [key for key in keys if key.budgets and key.usable(now)]

    async def rules_in_force(self, fresh: bool = False) -> list[BudgetConfig]:
        """The rules that apply now: keel.yaml's, then the admin API's (re-read every `rules_refresh_s`)."""
        admin = self._admin
        if fresh or time.monotonic() - admin.loaded_at > self.rules_refresh_s:
            async with self._refresh_lock:
                if fresh or time.monotonic() - admin.loaded_at > self.rules_refresh_s:
                    admin.entries = [(rule_id, _stored_rule(text)) for rule_id, text in await self.backend.rules()]
                    admin.loaded_at = time.monotonic()
        return self.config_rules + [rule for _, rule in admin.entries]

    async def close(self) -> None:
        await self.backend.close()


def _scope_value(rule: BudgetConfig, ctx: Context) -> str | None:
    if rule.scope == "global":
        return None
    value = {"tenant": ctx.tenant, "key": ctx.key_id, "user": ctx.user, "feature": ctx.feature}[rule.scope]
    if value is None or (rule.match is not None and value != rule.match):
        return None
    return value


def _stored_rule(text: str) -> BudgetConfig:
    try:
        return BudgetConfig.model_validate_json(text)
    except ValidationError as exc:  # written by a newer Keel, or by hand
        raise ConfigError(f"a budget rule stored by the admin API is invalid ({exc}); delete it: {text}") from None


def _exceeded(counter: Counter, refusal: Refusal, amount: Nanos, now: float) -> BudgetExceeded:
    rule, period = counter.binding, counter.period
    window = {"day": f"daily budget ({period.label})", "month": f"monthly budget ({period.label})",
              "total": "total budget"}[period.window]
    budget = f"the global {window}" if counter.value is None else f"the {window} of {counter.scope} '{counter.value}'"
    transient = refusal.spent + amount <= counter.limit
    if transient:
        left = (f"has {_usd(counter.limit - refusal.spent)} left, but calls in flight hold "
                f"{_usd(refusal.reserved)} of it until they finish")
        advice = "Try again in a moment, or lower max_tokens or shorten the prompt to fit."
    else:
        left = f"has {_usd(max(0, counter.limit - refusal.spent))} left"
        advice = "Lower max_tokens or shorten the prompt to fit, or ask an administrator to raise the limit."
    if period.resets_at is not None:
        resets = f"It resets at {period.resets_at:%Y-%m-%d %H:%M} UTC."
        resets_in: float | None = period.resets_at.timestamp() - now
    else:
        resets, resets_in = "It does not reset.", None
    return BudgetExceeded(
        f"Budget exceeded: {budget}, {_usd(counter.limit)}, {left}, and this call could cost up to "
        f"{_usd(amount)} (its prompt plus its output limit at the model's price). {resets} {advice}",
        scope=rule.scope, window=period.window, limit_usd=rule.limit_usd, resets_in=resets_in, transient=transient,
    )


def _usd(nanos: Nanos) -> str:
    text = f"{to_usd(nanos):.6f}".rstrip("0").rstrip(".")
    return f"{text} USD"
