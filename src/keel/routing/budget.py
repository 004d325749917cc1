"""Budget-aware routing: when a budget the call is charged to has passed an alert threshold,
route one tier down instead of spending on the dearer one (and, later, being refused).

Only where `router.budget_downgrade: true`. The budget stage still holds and refuses as usual:
this only makes the hold smaller while spending is high.
"""

from __future__ import annotations

from keel.budgets.budgets import Budgets
from keel.cost.money import to_usd
from keel.pipeline import Call


class BudgetDowngrade:
    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    async def passed_alert(self, call: Call) -> str | None:
        """The first budget of the call past one of its alert thresholds below the cap (`key:k1 81%`), or None."""
        now = self.budgets.clock()
        # The budgets' current rules (keel.yaml's and the admin API's, re-read every few seconds).
        counters = self.budgets.counters(call.ctx, await self.budgets.rules_in_force(), now)
        if not counters:
            return None
        counts = await self.budgets.backend.snapshot([c.key for c in counters], now)
        for counter, (spent, _reserved) in zip(counters, counts, strict=True):
            if any(not t.is_cap and spent >= t.nanos for t in counter.thresholds):
                share = to_usd(spent) / to_usd(counter.limit) if counter.limit else 1.0
                return f"{counter.scope}:{counter.value or '*'} {share:.0%}"
        return None
