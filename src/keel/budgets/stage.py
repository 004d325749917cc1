"""The budget stage: hold a call's worst-case cost before it runs, settle its actual cost after.

A refused call never reaches the provider. A call that fails releases its hold (an upstream that
failed billed nothing); a stream settles when it ends, fails or is closed by the client, at what
it consumed. The actual cost is `ctx.cost`, charged by the cost stage just inside this one
(its finaliser runs before this stage's).
"""

from __future__ import annotations

import logging

from keel.budgets.alerts import AlertSender
from keel.budgets.budgets import Alert, Budgets, Reservation
from keel.cost.accounting import CostMeter
from keel.errors import BudgetExceeded, BudgetStoreUnavailable
from keel.pipeline import Call, Next, Reply

log = logging.getLogger("keel.budgets")


class BudgetStage:
    def __init__(self, budgets: Budgets, meter: CostMeter, alerts: AlertSender | None = None) -> None:
        self.budgets = budgets
        self.meter = meter
        self.alerts = alerts

    async def __call__(self, call: Call, next: Next) -> Reply:
        try:
            reservation = await self.budgets.reserve(call, self.meter.worst_case)
        except BudgetExceeded as refused:
            self._send(refused.alerts)
            raise
        try:
            reply = await next(call)
        except BaseException:
            await self._settle(call, reservation)
            raise
        reply.on_finish(lambda _: self._settle(call, reservation))
        return reply

    async def _settle(self, call: Call, reservation: Reservation) -> None:
        """Settle the call's hold to what it was charged. Never raises: the answer is the client's
        already; an unsettled hold lapses on its own."""
        try:
            self._send(await self.budgets.settle(reservation, call.ctx.cost.nanos))
        except BudgetStoreUnavailable:  # an outage, already logged by the store: no traceback to add
            log.error(
                "could not settle the budgets of request %s: the budget store (Redis) did not answer; its cost "
                "(%s nano-USD) is not counted in its budgets, and its hold lapses on its own",
                call.ctx.request_id, call.ctx.cost.nanos,
            )
        except Exception:
            log.exception(
                "could not settle the budgets of request %s (cost %s nano-USD); its hold lapses on its own",
                call.ctx.request_id, call.ctx.cost.nanos,
            )

    def _send(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            if self.alerts is not None:
                self.alerts.send(alert)
            else:
                log.warning("budget alert (no sender configured): %s", alert.payload())
