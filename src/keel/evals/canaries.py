"""Canary prompts: a small fixed set of prompts sent on a schedule to each listed model, so a provider's
silent model update shows up as a change in the answers (`keel drift`, docs/drift.md).

Each canary is an ordinary call through the pipeline (logged, costed, within budgets) with the feature
`keel.canary`, temperature 0, `max_tokens` from the config, the prompt's id in its metadata (so it is
found again even with content logging off) and `Cache-Control: no-cache, no-store` (a cached answer
would hide the change). A round runs at start-up, then every `every_s` seconds; a failed canary is
logged (it is in the request log too) and never stops the schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from keel.config import CanariesConfig
from keel.errors import KeelError
from keel.evals.drift import CANARY_FEATURE, canary_id
from keel.pipeline import Completion, Context, Reply
from keel.types import ChatRequest

log = logging.getLogger("keel.evals.canaries")

Handle = Callable[[ChatRequest, Context], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class CanaryResult:
    model: str
    prompt_id: str
    answer: str | None  # None: the call failed
    error: str | None = None


class CanarySchedule:
    """Sends the canaries: `run_once()` for one round, `start()`/`stop()` for the background schedule.
    `wait` is how the schedule waits between rounds (seconds); tests pass one they control."""

    def __init__(self, handle: Handle, config: CanariesConfig, *,
                 wait: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.handle = handle
        self.config = config
        self._wait = wait
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # rounds finished
        self.round_done = asyncio.Event()  # set after each round (cleared by whoever waits on it)

    async def run_once(self) -> list[CanaryResult]:
        """Every prompt to every model, one at a time (canaries are few; they need not compete with traffic)."""
        results = []
        for model in self.config.models:
            for prompt in self.config.prompts:
                results.append(await self._send(model, prompt))
        self.rounds += 1
        self.round_done.set()
        return results

    async def _send(self, model: str, prompt: str) -> CanaryResult:
        prompt_id = canary_id(prompt)
        request = ChatRequest.model_validate({
            "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": self.config.max_tokens, "metadata": {"canary": prompt_id},
        })
        ctx = Context(feature=CANARY_FEATURE, cache_control="no-cache, no-store")
        try:
            reply = await self.handle(request, ctx)
        except KeelError as exc:
            log.warning("canary %s to model '%s' failed: %s", prompt_id, model, exc.message)
            return CanaryResult(model, prompt_id, None, exc.message)
        answer = None
        if isinstance(reply, Completion):
            choices = reply.body.get("choices") or [{}]
            answer = (choices[0].get("message") or {}).get("content")
        return CanaryResult(model, prompt_id, answer if isinstance(answer, str) else None)

    def start(self) -> None:
        if self._task is None and self.config.prompts and self.config.models:
            self._task = asyncio.create_task(self._forever(), name="keel-canaries")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # a bug in one round must not end the schedule
                log.exception("a canary round failed")
            await self._wait(self.config.every_s)
