"""The cost stage: every call that reaches it is charged once, when it is settled, in `ctx.cost`.

It sits just inside the budget stage, so every stage that may get a billed answer is inside it
(their discarded answers are charged too: `ctx.cost.bill`). The budget stage settles its hold to
this charge and the observe stage logs it; neither computes a cost of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from keel.cost.accounting import CostMeter
from keel.pipeline import Call, Next, Reply

log = logging.getLogger("keel.cost")


class CostStage:
    def __init__(self, meter: CostMeter) -> None:
        self.meter = meter

    async def __call__(self, call: Call, next: Next) -> Reply:
        try:
            reply = await next(call)
        except BaseException:
            self._charge(call, None)  # no answer: only what was billed on the way (a blocked answer)
            raise
        reply.on_finish(lambda answered: self._charge(call, answered.completion()))
        return reply

    def _charge(self, call: Call, answer: Mapping[str, Any] | None) -> None:
        try:
            self.meter.charge(call, answer)
        except Exception:  # a pricing bug must not fail an answered call, nor lose its record
            log.exception("cost accounting failed for request %s; it is logged at no cost", call.ctx.request_id)
