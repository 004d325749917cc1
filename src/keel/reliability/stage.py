"""The reliability stage: whole-call deadline, per-attempt timeout, retries with backoff,
a circuit breaker per deployment, and fallback to the next deployment.

One attempt is a pass over the deployments in order: a deployment that fails with an error
worth a fallback hands the call to the next one at once; when every deployment has failed,
the attempt has failed and tenacity waits (backoff, or Retry-After) before the next pass.
An error that is the client's (a bad request) ends the call at once.

Streams are retried only until their first chunk: `prefetch` pulls it inside the attempt,
so a failure before it is retried like any other; later, a silence longer than the gap
timeout or the deadline ends the stream with an error the gateway sends as an SSE event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_any
from tenacity.stop import stop_base

from keel.errors import CircuitOpen, KeelError, StreamStalled, UpstreamError, UpstreamTimeout
from keel.pipeline import Attempt, Call, ChunkStream, Next, Reply
from keel.providers.base import Deployment
from keel.reliability.backoff import BackoffWithRetryAfter


class Reliability:
    async def __call__(self, call: Call, next: Next) -> Reply:
        model = call.model
        ctx = call.ctx
        ctx.deadline = ctx.started + model.timeout_s
        retrying = AsyncRetrying(
            stop=stop_any(stop_after_attempt(model.retry.max_attempts), _DeadlineWouldPass(ctx.deadline)),
            wait=BackoffWithRetryAfter(model.retry),
            retry=retry_if_exception(lambda e: isinstance(e, KeelError) and e.retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._one_pass(call, next)
        raise AssertionError("tenacity ended without an outcome")  # pragma: no cover

    async def _one_pass(self, call: Call, next: Next) -> Reply:
        """Try each deployment once, in order; return the first answer."""
        last: KeelError | None = None
        for deployment in call.deployments:
            if not deployment.breaker.allow():
                last = last or CircuitOpen(
                    f"deployment '{deployment.name}' is failing and paused for "
                    f"{deployment.breaker.retry_in():.1f} s more",
                    deployment=deployment.name,
                )
                continue
            try:
                return await self._attempt(call, next, deployment)
            except KeelError as exc:
                if isinstance(exc, UpstreamError):
                    deployment.breaker.record_failure()
                else:
                    deployment.breaker.record_success()  # it answered; the request was the problem
                if not exc.fallback:
                    raise
                last = exc
        assert last is not None
        raise last

    async def _attempt(self, call: Call, next: Next, deployment: Deployment) -> Reply:
        model, ctx = call.model, call.ctx
        record = Attempt(deployment=deployment.name, started=time.monotonic())
        ctx.attempts.append(record)
        limit = _earliest(ctx.remaining(), model.attempt_timeout_s)
        if call.stream:
            limit = _earliest(limit, model.first_chunk_timeout_s)
        try:
            if limit is not None and limit <= 0:
                raise TimeoutError
            async with asyncio.timeout(limit):
                reply = await next(replace(call, target=deployment))
                if isinstance(reply, ChunkStream):
                    try:
                        await reply.prefetch()
                    except BaseException:
                        await reply.aclose()
                        raise
        except TimeoutError:
            error = UpstreamTimeout(
                f"deployment '{deployment.name}' gave no {'first chunk' if call.stream else 'answer'} "
                f"within {limit:.3g} s", deployment=deployment.name,
            )
            record.ended, record.error = time.monotonic(), error.code
            raise error from None
        except KeelError as exc:
            exc.deployment = exc.deployment or deployment.name
            record.ended, record.error = time.monotonic(), exc.code
            raise
        record.ended = time.monotonic()
        ctx.deployment = deployment.name
        if isinstance(reply, ChunkStream):
            ctx.first_chunk_at = record.ended
            reply.wrap(lambda source: _guard_stream(source, call, deployment))
        else:
            deployment.breaker.record_success()
        return reply


async def _guard_stream(
    source: AsyncIterator[dict[str, Any]], call: Call, deployment: Deployment
) -> AsyncIterator[dict[str, Any]]:
    """After the first chunk: no silence longer than the gap timeout, nothing past the deadline."""
    gap = call.model.chunk_gap_timeout_s
    try:
        while True:
            limit = _earliest(call.ctx.remaining(), gap)
            try:
                async with asyncio.timeout(limit):
                    chunk = await source.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise StreamStalled(
                    f"deployment '{deployment.name}' went silent mid-stream for {limit:.3g} s; "
                    "the stream was ended", deployment=deployment.name,
                ) from None
            yield chunk
    except UpstreamError:
        deployment.breaker.record_failure()
        raise
    else:
        deployment.breaker.record_success()
    finally:
        closer = getattr(source, "aclose", None)
        if closer is not None:
            await closer()


def _earliest(*limits: float | None) -> float | None:
    present = [x for x in limits if x is not None]
    return min(present) if present else None


class _DeadlineWouldPass(stop_base):
    """Stop retrying when the next wait would end past the whole-call deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        upcoming = state.upcoming_sleep or 0.0
        return time.monotonic() + upcoming >= self.deadline
