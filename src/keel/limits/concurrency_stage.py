"""The concurrency stage: a call holds a slot of its API key's gate (`limits.concurrency.per_key`, or a
virtual key's own `max_concurrency`) from here until its reply is settled (a stream's last chunk), so
one key cannot take every slot of the deployments behind it. It sits just inside the rate limit stage:
a call over its rate is refused before it waits for a slot. A call without a key id (in-process) is not
limited here; the deployments' own limits (`max_concurrency`) are held by the reliability stage per attempt.
"""

from __future__ import annotations

import time

from keel.limits.concurrency import KeyConcurrency
from keel.pipeline import Call, Next, Reply


class ConcurrencyStage:
    def __init__(self, keys: KeyConcurrency) -> None:
        self.keys = keys

    async def __call__(self, call: Call, next: Next) -> Reply:
        ctx = call.ctx
        own = ctx.key.limits.max_concurrency if ctx.key is not None else None
        limit = own or self.keys.settings.per_key
        if limit is None or ctx.key_id is None:
            return await next(call)
        deadline = ctx.started + call.model.timeout_s
        if ctx.deadline is not None:
            deadline = min(deadline, ctx.deadline)
        slot = await self.keys.enter(ctx.key_id, limit, deadline - time.monotonic())
        try:
            reply = await next(call)
        except BaseException:
            slot.release()
            raise
        reply.on_finish(slot.release)
        return reply
