"""A concurrency gate (keel.limits.concurrency): slots, a bounded line of waiters, hand-over, no leaks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from keel.config import ConcurrencyConfig, ConfigError, parse_config
from keel.errors import ConcurrencyExceeded
from keel.limits.concurrency import CallerConcurrency, CallerGates, ConcurrencyLimit
from keel.limits.concurrency_stage import ConcurrencyStage
from keel.pipeline import Call, Context
from keel.types import ChatRequest


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
    keys = CallerGates(ConcurrencyConfig(), "key")
    slot = await keys.enter("key_a", 2, None)
    assert set(keys.gates) == {"key_a"}
    slot.release()
    assert keys.gates == {}


class HeldReply:
    """What `next` answers in the stage tests: its finalisers run when the test settles it."""

    def __init__(self) -> None:
        self.finishers: list[Any] = []

    def on_finish(self, finisher: Any) -> None:
        self.finishers.append(finisher)

    def settle(self) -> None:
        for finisher in self.finishers:
            finisher(self)


def tenant_call(key_id: str, tenant: str) -> Call:
    model = parse_config({"models": [{"name": "m", "timeout_s": 60, "deployments": [{"provider": "simulated"}]}]})
    return Call(request=ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}]),
                model=model.models[0], deployments=(), ctx=Context(key_id=key_id, tenant=tenant))


async def test_the_per_tenant_limit_holds_all_of_a_tenants_keys_together_and_not_another_tenant() -> None:
    gates = CallerConcurrency(ConcurrencyConfig(per_tenant=2, max_wait_s=0.05, retry_after_s=2))
    stage = ConcurrencyStage(gates)
    entered = 0

    async def held(call: Call) -> Any:
        nonlocal entered
        entered += 1
        return HeldReply()

    first = await stage(tenant_call("key_1", "acme"), held)
    second = await stage(tenant_call("key_2", "acme"), held)  # another key of acme: the tenant's second slot
    with pytest.raises(ConcurrencyExceeded, match="tenant 'acme' has 2 calls in flight") as refused:
        await stage(tenant_call("key_3", "acme"), held)  # a third key, but acme's two slots are taken
    assert refused.value.scope == "tenant" and refused.value.headers() == {"retry-after": "2"}
    other = await stage(tenant_call("key_4", "globex"), held)  # another tenant is not held back
    assert entered == 3 and gates.tenants.shed == 1
    first.settle()  # a slot of acme frees: its next call goes through
    third = await stage(tenant_call("key_3", "acme"), held)
    for reply in (second, other, third):
        reply.settle()
    assert gates.tenants.gates == {} and gates.keys.gates == {}


async def test_a_call_refused_by_its_tenant_gives_back_its_keys_slot() -> None:
    gates = CallerConcurrency(ConcurrencyConfig(per_key=1, per_tenant=1, max_wait_s=0.01))
    stage = ConcurrencyStage(gates)

    async def held(call: Call) -> Any:
        return HeldReply()

    holding = await stage(tenant_call("key_1", "acme"), held)
    with pytest.raises(ConcurrencyExceeded, match="tenant 'acme'"):
        await stage(tenant_call("key_2", "acme"), held)
    assert "key_2" not in gates.keys.gates  # its key's slot was taken first, then given back
    holding.settle()
    assert gates.tenants.gates == {} and gates.keys.gates == {}


def test_a_per_tenant_limit_without_virtual_keys_is_refused_saying_where_tenants_come_from() -> None:
    with pytest.raises(ConfigError, match=r"set auth\.virtual_keys: true"):
        parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
                      "limits": {"concurrency": {"per_tenant": 4}}})
