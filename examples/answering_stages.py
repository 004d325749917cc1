"""Stages that answer without the model, refuse with their own error, and rewrite a stream as it passes.

    python examples/answering_stages.py
"""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from keel import Call, ChunkStream, Completion, Keel, KeelError, Reply
from keel.config import parse_config
from keel.pipeline import Next
from keel.types import ChatRequest


class Maintenance(KeelError):
    status = 503
    type = "api_error"
    code = "maintenance"


class Canned:
    """Answer 'ping' without calling the model; refuse everything during maintenance."""

    def __init__(self) -> None:
        self.maintenance = False

    async def __call__(self, call: Call, next: Next) -> Reply:
        if self.maintenance:
            raise Maintenance("Back in five minutes.")
        if isinstance(call.request, ChatRequest) and not call.stream and call.request.last_user_text() == "ping":
            return Completion({
                "id": "chatcmpl-canned", "object": "chat.completion", "created": int(time.time()),
                "model": call.model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong", "refusal": None},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })
        return await next(call)


class Shout:
    """Upper-case streamed text as it passes, and log the whole answer once at the end."""

    async def __call__(self, call: Call, next: Next) -> Reply:
        reply = await next(call)
        if isinstance(reply, ChunkStream):
            reply.wrap(upper)
            reply.on_finish(lambda s: print(f"\n[{call.ctx.request_id}] {''.join(s.content)!r} error={s.error!r}"))
        return reply


async def upper(source: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    async for chunk in source:
        for choice in chunk.get("choices") or ():
            if choice["delta"].get("content"):
                choice["delta"]["content"] = choice["delta"]["content"].upper()
        yield chunk


async def main() -> None:
    config = parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}]})
    canned = Canned()
    async with Keel(config, stages=[canned, Shout()]) as keel:
        reply = await keel.chat(model="sim", messages=[{"role": "user", "content": "ping"}])
        print(reply.choices[0].message.content)                      # pong
        async for chunk in await keel.chat(model="sim", messages=[{"role": "user", "content": "hi"}], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="")       # ECHO: HI
        canned.maintenance = True
        try:
            await keel.chat(model="sim", messages=[{"role": "user", "content": "hi"}])
        except Maintenance as exc:
            print(exc.status, exc.body())


asyncio.run(main())
