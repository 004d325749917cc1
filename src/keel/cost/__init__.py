"""Cost: prices of models, what a call cost, and the most it could cost.

Money is counted in whole nano-dollars (`keel.cost.money`); `ctx.cost.usd` is the edge.
"""

from keel.cost.accounting import CostMeter
from keel.cost.money import NANOS_PER_USD, Nanos, to_nanos, to_usd
from keel.cost.pricing import BUILT_IN, CHECKED, PricingTable, cost, cost_nanos

__all__ = [
    "BUILT_IN", "CHECKED", "NANOS_PER_USD", "CostMeter", "Nanos", "PricingTable", "cost", "cost_nanos", "to_nanos",
    "to_usd",
]
