"""What a deployment does with answers that are not a plain 2xx of ordinary size: redirects,
answers past `max_response_mb`, and a request lost on a reused keep-alive connection — each
through the whole pipeline in-process, as the reliability stage sees it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from test_http_client import RawServer, ok

from keel.engine import Keel
from keel.errors import UpstreamConnectionError, UpstreamRedirected, UpstreamResponseTooLarge
from keel.pipeline import Completion, Context
from keel.types import ChatRequest

COMPLETION = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
})
FAST_RETRY = {"initial_backoff_ms": 1, "max_backoff_ms": 5}


async def answer_completion(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    writer.write(ok(COMPLETION))
    await writer.drain()


def redirect_to(location: str, status: int = 307) -> Callable[..., Any]:
    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 %d Moved\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % (status, location.encode()))
        await writer.drain()
    return redirect


def openai(url: str, name: str = "up", **settings: Any) -> dict[str, Any]:
    return {"provider": "openai", "name": name, "base_url": url, "model": "gpt-4o-mini", **settings}


async def chat(keel: Keel, ctx: Context | None = None) -> Completion:
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    reply = await keel.handle(request, ctx or Context())
    assert isinstance(reply, Completion)
    return reply


async def test_a_redirect_is_an_error_naming_status_and_location_and_the_next_deployment_answers(
        keel_for: Callable[..., Keel]) -> None:
    async with RawServer(redirect_to("https://api.moved.example/v1/chat/completions")) as moved, \
            RawServer(answer_completion) as fallback:
        keel = keel_for(openai(moved.url, "moved"), openai(fallback.url, "fallback"), retry=FAST_RETRY)
        ctx = Context()
        reply = await chat(keel, ctx)
        assert reply.completion()["choices"][0]["message"]["content"] == "hi"
        first = ctx.attempts[0]
        assert (first.deployment, first.error) == ("moved", "upstream_redirected")
        assert len(moved.bodies) == 1, "a redirect is not retried on the same deployment"

        alone = keel_for(openai(moved.url, "moved"), retry=FAST_RETRY)
        with pytest.raises(UpstreamRedirected) as caught:
            await chat(alone)
        message = caught.value.message
        assert "answered 307" in message and "https://api.moved.example/v1/chat/completions" in message
        assert "follow_redirects: true" in message


async def test_a_deployment_that_follows_redirects_posts_again_to_the_location(
        keel_for: Callable[..., Keel]) -> None:
    async with RawServer(answer_completion) as target:
        async with RawServer(redirect_to(f"{target.url}/chat/completions?from=old", 308)) as moved:
            keel = keel_for(openai(moved.url, follow_redirects=True))
            assert (await chat(keel)).completion()["choices"][0]["message"]["content"] == "hi"
            assert target.bodies == moved.bodies, "the same body, sent again"
            assert target.heads[0].startswith(b"POST /v1/chat/completions?from=old HTTP/1.1")

        async with RawServer(redirect_to("/v1/elsewhere", 302)) as found:
            keel = keel_for(openai(found.url, follow_redirects=True))
            with pytest.raises(UpstreamRedirected, match="only 307/308 keep the POST"):
                await chat(keel)


async def test_an_answer_past_max_response_mb_fails_the_attempt_clearly(keel_for: Callable[..., Keel]) -> None:
    huge = COMPLETION[:-1] + b', "padding": "' + b"x" * (2 * 1024 * 1024) + b'"}'

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(ok(huge))
        await writer.drain()

    async with RawServer(send) as server:
        keel = keel_for(openai(server.url, max_response_mb=1), retry=FAST_RETRY)
        with pytest.raises(UpstreamResponseTooLarge, match="max_response_mb") as caught:
            await chat(keel)
        assert caught.value.status == 502
        assert len(server.bodies) == 1, "the same answer would come again: not retried"
        assert (await chat(keel_for(openai(server.url), retry=FAST_RETRY))).completion()["padding"]


async def test_a_request_lost_on_a_reused_connection_is_a_logged_attempt_of_its_own(
        keel_for: Callable[..., Keel]) -> None:
    async def lose_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 2:  # read the request on the kept-alive connection, then closed without answering
            writer.transport.abort()
            return
        await answer_completion(reader, writer, n)

    async with RawServer(lose_second) as server:
        keel = keel_for(openai(server.url), retry={**FAST_RETRY, "max_attempts": 2})
        await chat(keel)
        ctx = Context()
        await chat(keel, ctx)
        assert [a.error for a in ctx.attempts] == ["upstream_connection_error", None]
        assert len(server.bodies) == 3

        once = keel_for(openai(server.url), retry={**FAST_RETRY, "max_attempts": 1})
        await chat(once)
        server.handler = lambda r, w, n: (w.transport.abort(), asyncio.sleep(0))[1]
        with pytest.raises(UpstreamConnectionError, match="pooled keep-alive"):
            await chat(once)
