"""A concurrency gate (keel.limits.concurrency): slots, a bounded line of waiters, hand-over, no leaks."""

from __future__ import annotations

import asyncio

import pytest

from keel.config import ConcurrencyConfig
from keel.errors import ConcurrencyExceeded
from keel.limits.concurrency import ConcurrencyLimit, KeyConcurrency


def gate(limit: int = 1, **settings: float) -> ConcurrencyLimit:
    return ConcurrencyLimit(limit, ConcurrencyConfig(**settings), scope="deployment", name="d")


async def queued(limit: ConcurrencyLimit, waiting: int) -> None:
    """Run the loop until `waiting` calls wait on `limit` (a new task queues at its first await, no I/O)."""
    for _ in range(100):
        if limit.waiting == waiting:
            return
        await asyncio.sleep(0)  # one turn of the loop, not a wait for time
    raise AssertionError(f"{limit.waiting} calls waiting, expected {waiting}")


async def test_a_full_line_of_waiters_refuses_the_next_call_at_once_never_queueing_it() -> None:
    limit = gate(1, max_waiting=1, max_wait_s=60)
    await limit.enter(None)
    waiter = asyncio.create_task(limit.enter(None))
    await queued(limit, 1)
    with pytest.raises(ConcurrencyExceeded, match="1 call already waiting"):
        await limit.enter(None)  # refused without waiting: the test would hang for 60 s otherwise
    assert limit.shed == 1 and limit.waiting == 1
    waiter.cancel()


async def test_a_freed_slot_goes_to_the_oldest_waiter_and_is_counted_once() -> None:
    limit = gate(1, max_wait_s=60)
    held = await limit.enter(None)
    first = asyncio.create_task(limit.enter(None))
    await queued(limit, 1)  # first in line before the second is made
    second = asyncio.create_task(limit.enter(None))
    await queued(limit, 2)
    assert limit.waiting == 2
    held.release()
    held.release()  # a second release of one slot does nothing
    slot = await first
    assert not second.done() and limit.in_flight == 1
    slot.release()
    (await second).release()
    assert limit.idle


async def test_the_wait_ends_at_the_calls_deadline_and_a_cancelled_waiter_leaks_no_slot() -> None:
    limit = gate(1, max_wait_s=60, retry_after_s=3)
    held = await limit.enter(None)
    with pytest.raises(ConcurrencyExceeded) as refused:
        await limit.enter(0.01)  # what is left of its deadline, not max_wait_s
    assert refused.value.status == 503 and refused.value.headers() == {"retry-after": "3"}
    waiter = asyncio.create_task(limit.enter(None))
    await queued(limit, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    held.release()
    assert limit.idle


async def test_a_keys_gate_is_dropped_once_idle() -> None:
    keys = KeyConcurrency(ConcurrencyConfig())
    slot = await keys.enter("key_a", 2, None)
    assert set(keys.gates) == {"key_a"}
    slot.release()
    assert keys.gates == {}
