"""OpenAI's rate-limit headers, from the state the rate-limit stage leaves in `ctx.rate_limit`.

    x-ratelimit-limit-requests: 600        x-ratelimit-limit-tokens: 150000
    x-ratelimit-remaining-requests: 599    x-ratelimit-remaining-tokens: 149000
    x-ratelimit-reset-requests: 59.8s      x-ratelimit-reset-tokens: 1m59.8s

Of the limits a call is counted against, each kind reports the one with the least left: the one
that would refuse first. Reset is the time until what is counted now no longer weighs in, written
as OpenAI writes it (`20ms`, `1.5s`, `6m0s`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reading:
    limit: int
    remaining: int
    reset_s: float


@dataclass(slots=True)
class RateLimitState:
    """The tightest limit of each kind, as the call left them (None: no limit of that kind)."""

    requests: Reading | None = None
    tokens: Reading | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        for kind, reading in (("requests", self.requests), ("tokens", self.tokens)):
            if reading is not None:
                out += [
                    (b"x-ratelimit-limit-" + kind.encode(), b"%d" % reading.limit),
                    (b"x-ratelimit-remaining-" + kind.encode(), b"%d" % reading.remaining),
                    (b"x-ratelimit-reset-" + kind.encode(), duration(reading.reset_s).encode()),
                ]
        return out


def tighter(current: Reading | None, candidate: Reading) -> Reading:
    """The reading that leaves less (the longer reset on a tie)."""
    if current is None or candidate.remaining < current.remaining:
        return candidate
    if candidate.remaining == current.remaining and candidate.reset_s > current.reset_s:
        return candidate
    return current


def duration(seconds: float) -> str:
    """`20ms`, `1s`, `1.5s`, `6m0s`, as in OpenAI's x-ratelimit-reset-* headers."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"
