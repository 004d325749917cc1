"""Money as integers: nano-dollars (1e-9 USD).

Counters, reservations and logged costs are whole nano-dollars, so the sum of the costs
logged for a window equals the budget counter exactly; floats appear only at the edges
(`CallCost.usd`, alert payloads, the admin API). One token of the cheapest hosted
model costs tens of nano-dollars, so nothing is lost to rounding that a bill would show,
and an int64 holds 9.2e9 USD. Redis' Lua compares counters as doubles: exact up to 2**53
nano-dollars (about 9 million USD per counter).
"""

from __future__ import annotations

import math
from decimal import Decimal

NANOS_PER_USD = 1_000_000_000

Nanos = int


def to_nanos(usd: float | Decimal) -> Nanos:
    """USD to nano-dollars, rounded up: a limit or a cost is never understated."""
    return math.ceil(Decimal(str(usd)) * NANOS_PER_USD)


def to_usd(nanos: Nanos) -> float:
    return nanos / NANOS_PER_USD
