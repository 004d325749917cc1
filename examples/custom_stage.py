"""Writing a stage (docs/pipeline.md, "Writing a stage"): one object with one async method,
placed in the pipeline by the `Keel` constructor, outermost first.

`AttemptReport` sits outside the reliability stage, so it sees each call once, after every retry
and fallback. Its bookkeeping is a finaliser, registered the same way on a whole answer and on a
stream: it runs once the reply has been delivered (a stream: at its end), never delaying it.
`NoShouting` refuses a call with a `KeelError` before any money is spent.

    python examples/custom_stage.py
"""

import asyncio
import time
from pathlib import Path

from keel import Call, Keel, Reply
from keel.config import load_config
from keel.errors import InvalidRequest
from keel.pipeline import Next
from keel.types import ChatRequest


class AttemptReport:
    """Print, per call, how it ended and the deployments tried, once its reply has been delivered."""

    async def __call__(self, call: Call, next: Next) -> Reply:
        started = time.monotonic()
        reply = await next(call)
        reply.on_finish(lambda answered: self.report(call, started, answered))
        return reply

    def report(self, call: Call, started: float, answered: Reply) -> None:
        text = answered.completion()["choices"][0]["message"]["content"] or ""
        ended = "answered" if answered.error is None else f"ended by {answered.error!r}"
        tries = ", ".join(f"{a.deployment}:{a.error or 'ok'}" for a in call.ctx.attempts)
        print(f"[{call.ctx.request_id}] {ended} ({len(text)} chars) by {call.ctx.deployment} "
              f"in {time.monotonic() - started:.3f} s after {tries}")


class NoShouting:
    """Refuse a request before any money is spent: raise without calling `next`."""

    async def __call__(self, call: Call, next: Next) -> Reply:
        if isinstance(call.request, ChatRequest) and call.request.last_user_text().isupper():
            raise InvalidRequest("Please do not shout.", param="messages")
        return await next(call)


async def main() -> None:
    config = load_config(Path(__file__).with_name("simulated.yaml"))
    async with Keel(config, stages=[AttemptReport(), NoShouting()]) as keel:  # outermost first
        for _ in range(3):
            reply = await keel.chat(model="flaky", messages=[{"role": "user", "content": "hello"}])
            print("  ->", reply.choices[0].message.content)
        chunks = await keel.chat(model="sim", messages=[{"role": "user", "content": "a stream"}], stream=True)
        async for _chunk in chunks:
            pass
        try:
            await keel.chat(model="sim", messages=[{"role": "user", "content": "HELLO"}])
        except InvalidRequest as exc:
            print("refused:", exc.status, exc.code, exc.message)


asyncio.run(main())
