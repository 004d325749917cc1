"""Bounded fan-out (`keel.parallel`, `Keel.gather` / `Keel.map`): never more than N in flight, results
in input order with each error in its place, fail_fast, cancellation that leaves nothing running,
lazy reading of items, one parent span, and Keel's own 429s returned per item."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import inspect
import random
import subprocess
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RecordingSink

from keel import parallel
from keel.config import KeelConfig, TracingConfig, parse_config
from keel.engine import Keel
from keel.errors import RateLimited
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing
from keel.parallel import CallCancelled
from keel.pipeline import Call, Next, Reply
from keel.types import ChatCompletion

ROOT = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "hello"}]


class Gate:
    """Fake calls that wait until the test releases them: counts what is in flight, with no sleeps."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self.release: dict[int, asyncio.Event] = {}
        self.cancelled: list[int] = []
        self.started_ids: list[int] = []

    def call(self, i: int, *, fail: bool = False) -> Callable[[], Awaitable[int]]:
        self.release[i] = asyncio.Event()

        async def run() -> int:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.started_ids.append(i)
            self.started.put_nowait(i)
            try:
                await self.release[i].wait()
            except asyncio.CancelledError:
                self.cancelled.append(i)
                raise
            finally:
                self.in_flight -= 1
            if fail:
                raise ValueError(f"item {i} broke")
            return i * 10

        return run

    async def wait_started(self, count: int) -> list[int]:
        return [await self.started.get() for _ in range(count)]


async def test_never_more_than_n_in_flight_and_n_are_used() -> None:
    gate, n, total = Gate(), 3, 20
    rng = random.Random(5)
    running = asyncio.create_task(parallel.gather([gate.call(i) for i in range(total)], concurrency=n))
    waiting: list[int] = []
    for done in range(total):
        while len(waiting) < min(n, total - done):  # the fan-out fills every free slot
            waiting.append(await gate.started.get())
        assert len(waiting) <= gate.in_flight <= n  # released ones may not have ended yet
        gate.release[waiting.pop(rng.randrange(len(waiting)))].set()  # finish in a random order
    results = await running
    assert gate.peak == n
    assert results == [i * 10 for i in range(total)]  # input order, whatever the finishing order


async def test_errors_are_returned_in_their_place_and_the_rest_still_run() -> None:
    gate = Gate()
    broken = {1, 4}
    calls = [gate.call(i, fail=i in broken) for i in range(6)]
    running = asyncio.create_task(parallel.gather(calls, concurrency=2))
    for _ in range(6):
        gate.release[await gate.started.get()].set()
    results = await running
    for i, result in enumerate(results):
        if i in broken:
            assert isinstance(result, ValueError) and str(result) == f"item {i} broke"
        else:
            assert result == i * 10
    assert sorted(gate.started_ids) == list(range(6))


async def test_coroutines_and_functions_may_be_mixed() -> None:
    async def value(x: int) -> int:
        return x

    results = await parallel.gather([value(1), lambda: value(2), value(3)], concurrency=2)
    assert results == [1, 2, 3]


async def test_fail_fast_cancels_those_in_flight_and_starts_no_more() -> None:
    gate = Gate()
    pending = [value_of(i) for i in range(6, 10)]  # coroutine objects of a list, never to be started
    calls: list[Any] = [gate.call(0), gate.call(1, fail=True), gate.call(2), *pending]
    running = asyncio.create_task(parallel.gather(calls, concurrency=3, fail_fast=True))
    assert sorted(await gate.wait_started(3)) == [0, 1, 2]
    gate.release[1].set()
    results = await running
    assert sorted(gate.cancelled) == [0, 2] and gate.in_flight == 0
    assert isinstance(results[1], ValueError)
    assert len(results) == len(calls)  # a list: every item has its place
    for i in (0, 2):
        error = results[i]
        assert isinstance(error, CallCancelled) and error.started and error.cause_index == 1
        assert "fail_fast=True" in error.message and "item 1 failed first" in error.message
    for i in range(3, 7):
        error = results[i]
        assert isinstance(error, CallCancelled) and not error.started and error.cause is results[1]
    assert all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in pending)  # no "never awaited"


async def value_of(x: int) -> int:
    return x


async def test_without_fail_fast_an_error_cancels_nothing() -> None:
    gate = Gate()
    running = asyncio.create_task(parallel.gather([gate.call(0, fail=True), gate.call(1)], concurrency=2))
    await gate.wait_started(2)
    gate.release[0].set()
    gate.release[1].set()
    results = await running
    assert isinstance(results[0], ValueError) and results[1] == 10 and gate.cancelled == []


async def test_cancelling_the_gather_cancels_in_flight_starts_no_more_and_leaves_no_task() -> None:
    gate = Gate()
    later = [value_of(i) for i in range(5)]
    running = asyncio.create_task(parallel.gather([gate.call(0), gate.call(1), *later], concurrency=2))
    await gate.wait_started(2)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert sorted(gate.cancelled) == [0, 1] and gate.in_flight == 0
    assert all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in later)
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_items_are_taken_only_when_a_slot_is_free() -> None:
    gate = Gate()
    taken: list[int] = []

    def items() -> Iterator[int]:
        for i in range(10_000):
            taken.append(i)
            yield i

    async def fn(i: int) -> int:
        return await gate.call(i)()

    running = asyncio.create_task(parallel.map(fn, items(), concurrency=4))
    await gate.wait_started(4)
    assert taken == [0, 1, 2, 3]  # not 10,000 items (or tasks) up front
    gate.release[2].set()
    assert await gate.started.get() == 4
    assert taken == [0, 1, 2, 3, 4]
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert taken == [0, 1, 2, 3, 4] and gate.in_flight == 0


async def test_map_keeps_the_order_of_its_items() -> None:
    async def double(x: int) -> int:
        return 2 * x

    assert await parallel.map(double, range(7), concurrency=3) == [0, 2, 4, 6, 8, 10, 12]


async def test_a_failing_iterator_is_raised_after_the_calls_in_flight_are_cancelled() -> None:
    gate = Gate()

    def calls() -> Iterator[Any]:
        yield gate.call(0)
        yield value_of(1)  # ends at once: its slot lets the feeder read on, into the error
        yield gate.call(2)
        raise RuntimeError("the caller's generator broke")

    running = asyncio.create_task(parallel.gather(calls(), concurrency=3))
    assert sorted(await gate.wait_started(2)) == [0, 2]
    with pytest.raises(RuntimeError, match="generator broke"):
        await running
    assert sorted(gate.cancelled) == [0, 2] and gate.in_flight == 0
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_calls_cancelled_before_their_first_step_are_never_built_nor_left_unawaited() -> None:
    gate = Gate()

    def calls() -> Iterator[Any]:  # all taken in one step (free slots), then the error: no task has run
        yield gate.call(0)
        yield value_of(1)
        raise RuntimeError("the caller's generator broke")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="generator broke"):
            await parallel.gather(calls(), concurrency=4)
        gc.collect()
    assert gate.started_ids == [] and asyncio.all_tasks() == {asyncio.current_task()}
    assert not [w for w in caught if "never awaited" in str(w.message)]


async def test_concurrency_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        await parallel.gather([], concurrency=0)


async def test_a_progress_bar_is_drawn_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    async def value(x: int) -> int:
        return x

    assert await parallel.map(value, [1, 2, 3], concurrency=2, progress="asking") == [1, 2, 3]
    assert "asking" in capsys.readouterr().err


# ---------------------------------------------------------------------------- through Keel


def sim_config(**top: Any) -> KeelConfig:
    return parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
                         "store": {"url": "sqlite:///keel.db"}, **top})


async def test_the_fan_out_is_one_span_with_every_call_its_child() -> None:
    sink = RecordingSink()
    tracing = Tracing(TracingConfig(), sink)
    keel = Keel(sim_config(), stages=[Observe(sink, tracing, Metrics())])
    keel.tracing = tracing  # `keel.trace` and the calls' spans to the one recording sink
    try:
        results = await keel.map(lambda q: keel.chat(model="sim", messages=[{"role": "user", "content": q}]),
                                 ["a", "b", "c", "d"], concurrency=2, name="questions")
    finally:
        await keel.close()
    assert [r.choices[0].message.content for r in results if isinstance(r, ChatCompletion)] == [
        "echo: a", "echo: b", "echo: c", "echo: d"]
    parent = sink.span("questions")
    assert parent.parent_id is None
    assert (parent.attributes["keel.parallel.items"], parent.attributes["keel.parallel.errors"]) == (4, 0)
    calls = [s for s in sink.spans if s.name == "chat sim"]
    assert len(calls) == 4
    assert {(s.trace_id, s.parent_id) for s in calls} == {(parent.trace_id, parent.span_id)}
    assert {r.trace_id for r in sink.records} == {parent.trace_id}


async def test_keels_own_rate_limit_is_returned_per_item() -> None:
    keel = Keel(sim_config(limits={"global": {"requests_per_minute": 2}}))
    try:
        results = await keel.gather([lambda: keel.chat(model="sim", messages=HELLO) for _ in range(5)],
                                    concurrency=5)
    finally:
        await keel.close()
    answered = [r for r in results if isinstance(r, ChatCompletion)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(answered) == 2 and len(refused) == 3
    assert all(r.status == 429 and r.retry_after for r in refused)


def test_gather_sync_runs_from_code_without_a_loop() -> None:
    keel = Keel(sim_config())
    try:
        results = keel.map_sync(lambda q: keel.chat(model="sim", messages=[{"role": "user", "content": q}]),
                                ["x", "y"], concurrency=2)
        more = keel.gather_sync([lambda: keel.chat(model="nope", messages=HELLO)])
    finally:
        keel.close_sync()
    assert [r.choices[0].message.content for r in results if isinstance(r, ChatCompletion)] == ["echo: x", "echo: y"]
    assert len(more) == 1 and isinstance(more[0], Exception) and "does not exist" in str(more[0])


# ---------------------------------------------------------------------------- the example


class Overlap:
    """A stage that holds every call until `expected` are in flight together: proves they overlap,
    without timing anything (a sequential run would never get there, and time out)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.in_flight = 0
        self.peak = 0
        self.all_in = asyncio.Event()

    async def __call__(self, call: Call, next: Next) -> Reply:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.in_flight >= self.expected:
            self.all_in.set()
        try:
            await asyncio.wait_for(self.all_in.wait(), timeout=30)
            return await next(call)
        finally:
            self.in_flight -= 1


async def test_the_examples_five_calls_are_in_flight_together() -> None:
    spec = importlib.util.spec_from_file_location("parallel_example", ROOT / "examples" / "parallel.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    overlap = Overlap(len(example.ASPECTS))
    keel = Keel(example.config(latency_ms=0), stages=[overlap])
    try:
        report = await example.in_parallel(keel, "tea")
    finally:
        await keel.close()
    assert overlap.peak == len(example.ASPECTS) == 5
    assert all(aspect in report for aspect in example.ASPECTS)


def test_the_example_runs_and_parallel_is_faster() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "parallel.py")], capture_output=True, text=True,
                          timeout=120, check=True)
    speedup = float(done.stdout.split("speed-up: ")[1].split("x")[0])
    # Five 200 ms calls then one: about 1.2 s against 0.4 s (3x); 2x leaves room for a busy machine.
    assert speedup > 2, done.stdout
