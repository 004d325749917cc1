"""The reliability stage: whole-call deadline, per-attempt timeout, retries with backoff,
a circuit breaker per deployment, and fallback to the next deployment.

One attempt is a pass over the deployments in order: a deployment that fails with an error
worth a fallback hands the call to the next one at once; when every deployment has failed,
the pass has failed and tenacity waits (backoff, or Retry-After) before the next pass, unless
that wait would end past the deadline (`retries.py`). An error that is the client's (a bad
request) ends the call at once; so does finding every breaker open, now or through the next
wait (failing fast is what breakers are for). Each attempt's outcome is recorded in `ctx.attempts`; each
fallback, retry and breaker change is logged (`keel.reliability.events`).

Streams are retried only until their first chunk: `prefetch` pulls it inside the attempt,
so a failure before it is retried like any other; later, a silence longer than the gap
timeout or the deadline ends the stream with an error the gateway sends as an SSE event
(`watchdog.py`). For a stream, `attempt_timeout_s` and `first_chunk_timeout_s` bound the wait for chunk one.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from dataclasses import replace

from keel.errors import CircuitOpen, ConcurrencyExceeded, KeelError, SLOShed, UpstreamError, UpstreamTimeout
from keel.pipeline import Attempt, Call, ChunkStream, Next, Reply
from keel.providers.base import Deployment
from keel.reliability import events
from keel.reliability.breaker import Permit
from keel.reliability.retries import retrying
from keel.reliability.watchdog import StreamWatchdog


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
        async for attempt in retrying(call):
            with attempt:
                if attempt.retry_state.attempt_number == 1:
                    raise first  # tenacity's attempt 1 is the first pass, already made
                return await self._one_pass(call, next, failures)
        raise AssertionError("tenacity ended without an outcome")  # pragma: no cover

    async def _one_pass(self, call: Call, next: Next, failures: list[KeelError]) -> Reply:
        """Try each deployment once, in order; return the first answer."""
        paused: list[str] = []
        failed: KeelError | None = None  # this pass's last failure
        healthy = _slo_healthy(call)
        for deployment in call.deployments:
            if failures and (call.ctx.remaining() or 0.0) <= 0:
                raise failures[-1]  # out of time: report what failed, not a try that had no time
            if deployment not in healthy:
                continue
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
        slot = None
        try:
            if deployment.concurrency is not None:  # a bounded wait for a slot, within the attempt's time
                slot = await deployment.concurrency.enter(limit)
            if limit <= 0:
                raise TimeoutError
            async with asyncio.timeout(limit if slot is None else limit - (time.monotonic() - record.started)):
                reply = await next(replace(call, target=deployment))
                if isinstance(reply, ChunkStream):
                    try:
                        await reply.prefetch()
                    except BaseException:
                        await reply.aclose()
                        raise
        except TimeoutError:
            if slot is not None:
                slot.release()
            waited_for = "first chunk" if call.stream else "answer"
            error = UpstreamTimeout(
                f"deployment '{deployment.name}' gave no {waited_for} within {limit_name}", deployment=deployment.name
            )
            _settle(call, deployment, permit, record, error)
            raise error from None
        except BaseException as exc:
            if slot is not None:
                slot.release()
            if isinstance(exc, KeelError):
                exc.deployment = exc.deployment or deployment.name
            _settle(call, deployment, permit, record, exc)
            raise
        call.ctx.deployment = deployment.name
        if isinstance(reply, ChunkStream):
            call.ctx.first_chunk_at = time.monotonic()
            settle = functools.partial(_settle, call, deployment, permit, record)
            reply.wrap(lambda source: StreamWatchdog(source, call, deployment.name, settle))
            if slot is not None:  # held until the stream ends
                reply.on_finish(slot.release)
        else:
            _settle(call, deployment, permit, record, None)
            if slot is not None:
                slot.release()
        return reply


def _slo_healthy(call: Call) -> Sequence[Deployment]:
    """The deployments this pass may try: all, but those set aside by their SLO guard while another is
    healthy (each diversion is an attempt in the record, error `slo_degraded`). With none healthy,
    `shed` refuses the call; `fallback` tries them all, as a last resort beats no answer."""
    deployments = call.deployments
    degraded = [d for d in deployments if d.slo is not None and d.slo.degraded()]
    if not degraded:
        return deployments
    healthy = [d for d in deployments if d not in degraded]
    shed = not healthy and any(d.slo is not None and d.slo.action == "shed" for d in degraded)
    if healthy or shed:
        now = time.monotonic()
        for deployment in degraded:
            assert deployment.slo is not None
            deployment.slo.diversions += 1
            call.ctx.attempts.append(Attempt(deployment=deployment.name, started=now, ended=now, error="slo_degraded"))
    if healthy:
        return healthy
    if shed:
        reasons = "; ".join(f"'{d.name}': {d.slo.degraded()}" for d in degraded if d.slo is not None)
        raise SLOShed(
            f"model '{call.model.name}' is shedding load: its deployments break the SLO targets ({reasons}). "
            "Retry after the Retry-After.",
            retry_after=min(d.slo.retry_after() for d in degraded if d.slo is not None),
        )
    return deployments


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
    if isinstance(outcome, ConcurrencyExceeded):
        permit.release()  # never sent: says nothing of the deployment's health
    elif isinstance(outcome, UpstreamError):
        permit.failure()
    elif outcome is None or isinstance(outcome, KeelError):
        permit.success()
    else:
        permit.release()
    events.breaker_moved(call, deployment, before, outcome)
    if deployment.slo is not None and (outcome is None or isinstance(outcome, KeelError)):
        deployment.slo.observe((record.ended - record.started) * 1000, isinstance(outcome, UpstreamError))
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
