"""The reliability stage: whole-call deadline, per-attempt timeout, retries with backoff,
a circuit breaker per deployment, and fallback to the next deployment.

One attempt is a pass over the deployments in order: a deployment that fails with an error
worth a fallback hands the call to the next one at once; when every deployment has failed,
the pass has failed and tenacity waits (backoff, or Retry-After) before the next pass, unless
that wait would end past the deadline. An error that is the client's (a bad request) ends
the call at once; so does finding every breaker open, now or through the next wait (failing
fast is what breakers are for). Each attempt's outcome is recorded in `ctx.attempts`; each
fallback, retry and breaker change is logged (`keel.reliability.events`).

Streams are retried only until their first chunk: `prefetch` pulls it inside the attempt,
so a failure before it is retried like any other; later, a silence longer than the gap
timeout or the deadline ends the stream with an error the gateway sends as an SSE event.
For a stream, `attempt_timeout_s` and `first_chunk_timeout_s` bound the wait for chunk one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_any
from tenacity.stop import stop_base

from keel.errors import CircuitOpen, KeelError, StreamStalled, UpstreamError, UpstreamTimeout
from keel.pipeline import Attempt, Call, ChunkStream, Next, Reply
from keel.providers.base import Deployment
from keel.reliability import events
from keel.reliability.backoff import BackoffWithRetryAfter
from keel.reliability.breaker import Permit


class Reliability:
    """The stage; it keeps no state of its own (breakers live on the deployments)."""

    async def __call__(self, call: Call, next: Next) -> Reply:
        deadline = call.ctx.started + call.model.timeout_s
        call.ctx.deadline = deadline if call.ctx.deadline is None else min(call.ctx.deadline, deadline)
        failures: list[KeelError] = []  # this call's, oldest first
        try:
            # Most calls end in this first pass, so tenacity (whose machinery costs more than the
            # rest of this stage together) is only set up once it has failed.
            return await self._one_pass(call, next, failures)
        except KeelError as error:
            first = error
        return await self._retry(call, next, failures, first)

    async def _retry(self, call: Call, next: Next, failures: list[KeelError], first: KeelError) -> Reply:
        """Passes after the first, while the error is worth it, attempts remain and the wait
        before the next would end within the deadline."""
        retrying = AsyncRetrying(
            stop=stop_any(
                stop_after_attempt(call.model.retry.max_attempts),
                _DeadlineWouldPass(call.ctx.deadline or 0.0),
                _AllPausedThrough(call.deployments),
            ),
            wait=BackoffWithRetryAfter(call.model.retry),
            retry=_WORTH_RETRYING,
            before_sleep=lambda state: events.retrying(call, state),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number == 1:
                    raise first  # tenacity's attempt 1 is the first pass, already made
                return await self._one_pass(call, next, failures)
        raise AssertionError("tenacity ended without an outcome")  # pragma: no cover

    async def _one_pass(self, call: Call, next: Next, failures: list[KeelError]) -> Reply:
        """Try each deployment once, in order; return the first answer."""
        paused: list[str] = []
        failed: KeelError | None = None  # this pass's last failure
        for deployment in call.deployments:
            if failures and (call.ctx.remaining() or 0.0) <= 0:
                raise failures[-1]  # out of time: report what failed, not a try that had no time
            before = deployment.breaker.state
            permit = deployment.breaker.acquire()
            events.breaker_moved(call, deployment, before, None)
            if permit is None:
                paused.append(f"'{deployment.name}' for {deployment.breaker.retry_in():.1f} s more")
                continue
            if failed is not None:
                events.fallback(call, failed, deployment)
            try:
                return await self._attempt(call, next, deployment, permit)
            except KeelError as exc:
                if not exc.fallback:
                    raise
                failures.append(exc)
                failed = exc
        if failures:  # this pass's, or the earlier ones of this call that opened the breakers
            raise failures[-1]
        raise CircuitOpen(
            f"model '{call.model.name}' has no deployment to call: each failed repeatedly and is paused "
            f"({', '.join(paused)})",
            retry_after=min(d.breaker.retry_in() for d in call.deployments),
        )

    async def _attempt(self, call: Call, next: Next, deployment: Deployment, permit: Permit) -> Reply:
        """One deployment, once, within the attempt's time limit; the breaker hears how it went."""
        record = Attempt(deployment=deployment.name, started=time.monotonic())
        call.ctx.attempts.append(record)
        limit, limit_name = _attempt_limit(call)
        try:
            if limit <= 0:
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
            waited_for = "first chunk" if call.stream else "answer"
            error = UpstreamTimeout(
                f"deployment '{deployment.name}' gave no {waited_for} within {limit_name}", deployment=deployment.name
            )
            _settle(call, deployment, permit, record, error)
            raise error from None
        except BaseException as exc:
            if isinstance(exc, KeelError):
                exc.deployment = exc.deployment or deployment.name
            _settle(call, deployment, permit, record, exc)
            raise
        call.ctx.deployment = deployment.name
        if isinstance(reply, ChunkStream):
            call.ctx.first_chunk_at = time.monotonic()
            reply.wrap(lambda source: _GuardedStream(source, call, deployment, permit, record))
        else:
            _settle(call, deployment, permit, record, None)
        return reply


class _GuardedStream:
    """A stream after its first chunk: no silence longer than the gap timeout, nothing past the
    deadline; the breaker and the attempt record learn how it ended. Closing it closes the source,
    even when no chunk was pulled through it (the first one waits in the ChunkStream's buffer).

    One watchdog timer per stream, not a timeout per chunk: a chunk costs two clock reads, and
    the timer re-arms only when it fires. When it finds the deadline passed, or the upstream
    silent for longer than the gap while the reader waits, it cancels the waiting reader,
    and the cancellation becomes the timeout error here (the way asyncio.timeout works).
    """

    def __init__(
        self, source: AsyncIterator[dict[str, Any]], call: Call, deployment: Deployment, permit: Permit,
        record: Attempt,
    ) -> None:
        self.source = source
        self.call = call
        self.deployment = deployment
        self.permit = permit
        self.record = record
        self._loop = asyncio.get_running_loop()
        # The loop's clock may differ from time.monotonic (uvloop's has its own origin).
        self._deadline = self._loop.time() + (call.ctx.remaining() or 0.0)
        self._gap = call.model.chunk_gap_timeout_s
        self._waiting_since: float | None = None
        self._reader: asyncio.Task[Any] | None = None
        self._expired: UpstreamTimeout | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __aiter__(self) -> _GuardedStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._expired is not None:  # the deadline passed while the reader was away
            raise await self._fail(self._expired)
        self._reader = asyncio.current_task()
        self._waiting_since = self._loop.time()
        if self._timer is None:
            self._arm(self._waiting_since)
        try:
            return await self.source.__anext__()
        except StopAsyncIteration:
            self._stop_timer()
            _settle(self.call, self.deployment, self.permit, self.record, None)
            raise
        except asyncio.CancelledError:
            if self._expired is not None and self._reader is not None and self._reader.uncancel() == 0:
                raise await self._fail(self._expired) from None
            self._stop_timer()
            _settle(self.call, self.deployment, self.permit, self.record, asyncio.CancelledError())
            raise
        except BaseException as exc:
            self._stop_timer()
            _settle(self.call, self.deployment, self.permit, self.record, exc)
            raise
        finally:
            self._waiting_since = None

    async def aclose(self) -> None:
        """The reader stopped early: no verdict on the deployment, and the upstream is let go."""
        self._stop_timer()
        _settle(self.call, self.deployment, self.permit, self.record, asyncio.CancelledError())
        await self._close_source()

    def _arm(self, now: float) -> None:
        due = self._deadline
        if self._gap is not None:
            due = min(due, (self._waiting_since if self._waiting_since is not None else now) + self._gap)
        self._timer = self._loop.call_at(due, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        name = self.deployment.name
        if now >= self._deadline:
            self._expired = UpstreamTimeout(
                f"the call's deadline (timeout_s = {self.call.model.timeout_s:g} s) passed mid-stream from "
                f"deployment '{name}'; the stream was ended", deployment=name)
        elif self._gap is not None and self._waiting_since is not None and now - self._waiting_since >= self._gap:
            self._expired = StreamStalled(
                f"deployment '{name}' went silent mid-stream for {self._gap:g} s (chunk_gap_timeout_s); "
                "the stream was ended", deployment=name)
        if self._expired is None:
            self._arm(now)
        elif self._waiting_since is not None and self._reader is not None:
            self._reader.cancel()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    async def _fail(self, error: UpstreamTimeout) -> UpstreamTimeout:
        self._stop_timer()
        _settle(self.call, self.deployment, self.permit, self.record, error)
        await self._close_source()
        return error

    async def _close_source(self) -> None:
        closer = getattr(self.source, "aclose", None)
        if closer is not None:
            await closer()


def _settle(
    call: Call, deployment: Deployment, permit: Permit, record: Attempt, outcome: BaseException | None
) -> None:
    """Tell the breaker and the attempt record how an attempt ended (the first word counts).
    None is an answer; a Keel error that is not the upstream's means it answered too ("your
    request is wrong"); an upstream error is a failure; anything else (cancelled, abandoned,
    a bug) says nothing about the deployment."""
    if permit.settled:
        return
    record.ended = time.monotonic()
    before = deployment.breaker.state
    if isinstance(outcome, UpstreamError):
        permit.failure()
    elif outcome is None or isinstance(outcome, KeelError):
        permit.success()
    else:
        permit.release()
    events.breaker_moved(call, deployment, before, outcome)
    if isinstance(outcome, KeelError):
        record.error = outcome.code or "error"
    elif outcome is not None:
        record.error = "cancelled" if isinstance(outcome, asyncio.CancelledError) else "internal_error"


def _attempt_limit(call: Call) -> tuple[float, str]:
    """Seconds this attempt may take, and the setting that bounds it."""
    model = call.model
    limit, name = call.ctx.remaining() or 0.0, f"the call's deadline (timeout_s = {model.timeout_s:g} s)"
    candidates = [(model.attempt_timeout_s, "attempt_timeout_s")]
    if call.stream:
        candidates.append((model.first_chunk_timeout_s, "first_chunk_timeout_s"))
    for seconds, setting in candidates:
        if seconds is not None and seconds < limit:
            limit, name = seconds, f"{seconds:g} s ({setting})"
    return limit, name


def _worth_retrying(error: BaseException) -> bool:
    return isinstance(error, KeelError) and error.retryable and not isinstance(error, CircuitOpen)


_WORTH_RETRYING = retry_if_exception(_worth_retrying)


class _DeadlineWouldPass(stop_base):
    """Stop retrying when the next wait would end past the whole-call deadline. (tenacity runs
    the wait strategy before the stop check, so `upcoming_sleep` is the wait about to happen.)"""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return time.monotonic() + state.upcoming_sleep >= self.deadline


class _AllPausedThrough(stop_base):
    """Stop retrying when every deployment's breaker stays open past the next wait: the next
    pass could call nobody (the usual case: this call's failures just opened the last one)."""

    def __init__(self, deployments: Sequence[Deployment]) -> None:
        self.deployments = deployments

    def __call__(self, state: RetryCallState) -> bool:
        return all(d.breaker.retry_in() > state.upcoming_sleep for d in self.deployments)
