"""The concurrency stage: a call holds a slot of its API key's gate (`limits.concurrency.per_key`, or a
virtual key's own `max_concurrency`) and of its tenant's (`limits.concurrency.per_tenant`, all the tenant's
keys together) from here until its reply is settled (a stream's last chunk), so one key, or one tenant,
cannot take every slot of the deployments behind it. The key's slot is taken first: a call held back by
its own key does not sit on a slot its tenant's other keys could use. It sits just inside the rate limit
stage: a call over its rate is refused before it waits for a slot. A call without a key id (in-process)
is not limited here; the deployments' own limits (`max_concurrency`) are held by the reliability stage
per attempt.
"""

from __future__ import annotations

import time

from keel.limits.concurrency import CallerConcurrency, Slot
from keel.pipeline import Call, Next, Reply


class ConcurrencyStage:
    def __init__(self, gates: CallerConcurrency) -> None:
        self.gates = gates

    async def __call__(self, call: Call, next: Next) -> Reply:
        ctx = call.ctx
        own = ctx.key.limits.max_concurrency if ctx.key is not None else None
        settings = self.gates.settings
        key_limit = own or settings.per_key
        tenant_limit = settings.per_tenant if ctx.tenant is not None else None
        if ctx.key_id is None or (key_limit is None and tenant_limit is None):
            return await next(call)
        deadline = ctx.started + call.model.timeout_s
        if ctx.deadline is not None:
            deadline = min(deadline, ctx.deadline)
        slots: list[Slot] = []
        try:
            if key_limit is not None:
                slots.append(await self.gates.keys.enter(ctx.key_id, key_limit, deadline - time.monotonic()))
            if tenant_limit is not None and ctx.tenant is not None:
                slots.append(await self.gates.tenants.enter(ctx.tenant, tenant_limit, deadline - time.monotonic()))
            reply = await next(call)
        except BaseException:
            for slot in slots:
                slot.release()
            raise
        for slot in slots:
            reply.on_finish(slot.release)
        return reply
