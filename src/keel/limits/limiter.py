"""Charging a call to its rate limits, and correcting the charge once the call is over.

A call is charged one request and its token estimate (prompt plus its completion allowance) on
every limit that applies, all or nothing, in one atomic step of the backend; if any limit refuses,
nothing is counted and the call gets 429 with the wait until it would fit.

When the backend (Redis) cannot be reached, `on_backend_error` decides: `fail_open` lets calls
through uncounted, `fail_closed` refuses them with 503. Either way the outage is logged once
when it starts and once when it ends, and counted in /metrics; while it lasts, calls skip the
backend for `backend_retry_s` after each failure instead of each waiting out a timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from keel.errors import RateLimited, RateLimitStoreUnavailable, RequestOverRateLimit
from keel.limits.backends import DEFAULT_PREFIX, MemoryRateLimitBackend, RateLimitBackend, RedisRateLimitBackend
from keel.limits.headers import RateLimitState, Reading, tighter
from keel.limits.rules import Limit, RateRules
from keel.limits.windows import Window

if TYPE_CHECKING:
    from keel.config import KeelConfig

log = logging.getLogger("keel.limits")

OnBackendError = Literal["fail_open", "fail_closed"]


@dataclass(slots=True)
class Charge:
    """What a call was charged: the token hits to correct when it ends."""

    tokens: int
    hits: list[tuple[Limit, float]] = field(default_factory=list)  # token limits hit, with their window's shift_at
    settled: bool = False


class RateLimiter:
    def __init__(
        self, rules: RateRules, backend: RateLimitBackend, *, on_backend_error: OnBackendError = "fail_open",
        backend_retry_s: float = 1.0,
    ) -> None:
        self.rules = rules
        self.backend = backend
        self.on_backend_error = on_backend_error
        self.backend_retry_s = backend_retry_s
        self._down_since: float | None = None  # time.monotonic() of the outage's first failure
        self._skip_until = 0.0  # time.monotonic(): calls skip the backend until then
        self._outage_calls = 0  # calls decided by on_backend_error in the current outage
        self.backend_errors = 0  # ...in all (a counter in /metrics)
        self.refused: dict[tuple[str, str], int] = {}  # (scope, kind) → calls refused

    @classmethod
    def from_config(cls, config: KeelConfig) -> RateLimiter:
        """keel.yaml's `limits:`, in Redis when `limits.backend` is redis, else in this process."""
        limits = config.limits
        backend: RateLimitBackend
        if limits.backend == "redis":
            url = limits.redis_url or config.state.redis_url
            assert url is not None  # the config refuses a redis backend without one
            prefix = f"{config.state.key_prefix}:limits"
            backend = RedisRateLimitBackend(url, prefix, timeout_s=limits.backend_timeout_s)
        else:
            backend = MemoryRateLimitBackend()
        return cls(RateRules.from_config(config), backend, on_backend_error=limits.on_backend_error,
                   backend_retry_s=limits.backend_retry_s)

    # ------------------------------------------------------------------ charge and settle

    async def charge(
        self, limits: list[Limit], prompt_tokens: int, allowance: int, state: RateLimitState, *,
        explicit: bool = False,
    ) -> Charge | None:
        """Count one request, and `prompt_tokens + allowance` tokens (the completion allowance:
        `max_tokens`, `explicit` when the client set it), on `limits`; fill in `state` for the
        headers. Returns the charge to settle later, or None when the backend failed open (the
        call is not counted). Raises `RateLimited` (nothing counted) when a limit refuses."""
        tokens = self._fit(limits, prompt_tokens, allowance, explicit)
        costs = [1 if limit.kind == "requests" else tokens for limit in limits]
        if self._skipping():
            self._backend_down(None)
            return None
        try:
            counted, windows, fits = await self.backend.charge(limits, costs)
        except Exception as exc:
            self._backend_down(exc)
            return None
        self._backend_up()
        if not counted:  # nothing was counted: the headers show each limit as it stands
            refused = max(
                ((limit, cost, window) for limit, cost, window, fit in zip(limits, costs, windows, fits, strict=True)
                 if not fit),
                key=lambda each: each[2].wait_for(min(each[1], each[0].amount), each[0].amount),
            )
            for limit, window in zip(limits, windows, strict=True):
                _report(state, limit, Reading(limit.amount, window.remaining(limit.amount), window.reset_in()))
            limit, cost, window = refused
            _report(state, limit, Reading(limit.amount, 0, window.reset_in()), replace=True)
            raise self._refusal(limit, cost, window, window.wait_for(cost, limit.amount))
        charge = Charge(tokens)
        for limit, window in zip(limits, windows, strict=True):
            _report(state, limit, Reading(limit.amount, window.remaining(limit.amount), window.reset_in()))
            if limit.kind == "tokens":
                charge.hits.append((limit, window.shift_at))
        return charge

    async def settle(self, charge: Charge, used_tokens: int) -> None:
        """Move the call's token hits from the estimate to `used_tokens` (a failed call: what it
        consumed, often 0). Never raises: the answer is the client's already."""
        if charge.settled:
            return
        charge.settled = True
        delta = used_tokens - charge.tokens
        if not delta or not charge.hits:
            return
        now = time.time()
        try:
            for limit, shift_at in charge.hits:
                await self.backend.correct(limit, delta, shift_at, now)
        except Exception as exc:
            self._backend_down(exc, deciding=False)

    # ------------------------------------------------------------------ helpers

    def _fit(self, limits: list[Limit], prompt_tokens: int, allowance: int, explicit: bool) -> int:
        """The token charge, within every token limit (a charge above a limit could never be
        counted): a default allowance is lowered to fit; a prompt that cannot fit, or one whose
        own max_tokens cannot, is refused for good."""
        tokens = prompt_tokens + allowance
        for limit in limits:
            if limit.kind != "tokens" or tokens <= limit.amount:
                continue
            if prompt_tokens > limit.amount or explicit:
                self._count_refusal(limit)
            if prompt_tokens > limit.amount:
                raise RequestOverRateLimit(
                    f"Request too large for {limit.who} on tokens per minute (TPM): limit {limit.amount}, and this "
                    f"request's prompt alone is about {prompt_tokens} tokens. It can never fit; send a shorter "
                    "prompt.", scope=limit.scope,
                )
            if explicit:
                raise RequestOverRateLimit(
                    f"Request too large for {limit.who} on tokens per minute (TPM): limit {limit.amount}, requested "
                    f"about {tokens} (the prompt's {prompt_tokens} plus max_tokens {allowance}). It can never fit; "
                    f"lower max_tokens to at most {limit.amount - prompt_tokens}.", scope=limit.scope,
                )
            tokens = limit.amount
        return tokens

    def _refusal(self, limit: Limit, cost: int, window: Window, wait: float) -> RateLimited:
        self._count_refusal(limit)
        wait = max(wait, 0.001)
        per = "requests per minute (RPM)" if limit.kind == "requests" else "tokens per minute (TPM)"
        requested = "" if limit.kind == "requests" else f", requested {cost}"
        return RateLimited(
            f"Rate limit reached for {limit.who} on {per}: limit {limit.amount}, used "
            f"{min(window.used, limit.amount)}{requested}. Please try again in {_seconds(wait)}.",
            scope=limit.scope, kind=limit.kind, retry_after=wait,
        )

    def _count_refusal(self, limit: Limit) -> None:
        self.refused[(limit.scope, limit.kind)] = self.refused.get((limit.scope, limit.kind), 0) + 1

    def _skipping(self) -> bool:
        return self._down_since is not None and time.monotonic() < self._skip_until

    def _backend_down(self, exc: Exception | None, *, deciding: bool = True) -> None:
        """Note a failure (`exc`; None: a call skipping the backend during an outage); when
        `deciding` a call, apply on_backend_error: return (fail_open) or raise (fail_closed)."""
        now = time.monotonic()
        if exc is not None:
            self._skip_until = now + self.backend_retry_s
            if self._down_since is None:
                self._down_since = now
                action = "let through uncounted" if self.on_backend_error == "fail_open" else "refused with 503"
                log.error(
                    "the rate-limit store (Redis) cannot be reached (%s: %s): calls are %s (limits.on_backend_error: "
                    "%s) until it answers again", type(exc).__name__, exc, action, self.on_backend_error,
                )
        if not deciding:
            return
        self._outage_calls += 1
        self.backend_errors += 1
        if self.on_backend_error == "fail_closed":
            raise RateLimitStoreUnavailable(
                "The rate-limit store did not answer, so calls are refused rather than run unlimited; try again "
                "shortly. (Operators: check that Redis is up and that limits.redis_url is right.)",
                retry_after=max(1.0, self.backend_retry_s),
            )

    def _backend_up(self) -> None:
        if self._down_since is None:
            return
        log.warning(
            "the rate-limit store (Redis) answers again after %.1f s; %d calls were %s meanwhile",
            time.monotonic() - self._down_since, self._outage_calls,
            "let through uncounted" if self.on_backend_error == "fail_open" else "refused",
        )
        self._down_since = None
        self._outage_calls = 0

    async def close(self) -> None:
        await self.backend.close()

    # ------------------------------------------------------------------ /metrics

    def collect(self) -> Iterable[Metric]:
        """Read at scrape time (registered in Keel's metrics registry)."""
        refused = CounterMetricFamily(
            "keel_rate_limited", "Calls refused by Keel's own rate limits", labels=["scope", "kind"]
        )
        for (scope, kind), count in sorted(self.refused.items()):
            refused.add_metric([scope, kind], count)
        errors = CounterMetricFamily(
            "keel_rate_limit_backend_errors", "Calls the rate-limit store could not count, decided by "
            "limits.on_backend_error", labels=["action"],
        )
        errors.add_metric([self.on_backend_error], self.backend_errors)
        up = GaugeMetricFamily("keel_rate_limit_backend_up", "1 when the rate-limit store answers, 0 in an outage")
        up.add_metric([], 0 if self._down_since is not None else 1)
        return [refused, errors, up]


def _report(state: RateLimitState, limit: Limit, reading: Reading, *, replace: bool = False) -> None:
    if limit.kind == "requests":
        state.requests = reading if replace else tighter(state.requests, reading)
    else:
        state.tokens = reading if replace else tighter(state.tokens, reading)


def _seconds(wait: float) -> str:
    return f"{wait * 1000:.0f}ms" if wait < 1 else f"{wait:.1f}s"


__all__ = ["DEFAULT_PREFIX", "Charge", "RateLimiter"]
