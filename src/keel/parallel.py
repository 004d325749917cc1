"""Bounded parallel fan-out: run many calls with at most N in flight, results in input order, each
item's error returned in its place instead of raised.

    results = await gather([lambda: keel.chat(...), lambda: keel.chat(...)], concurrency=4)
    for result in results:
        if isinstance(result, Exception): ...   # mypy narrows: the error, else the value

Pure asyncio, nothing of Keel's pipeline: `Keel.gather` / `Keel.map` wrap these in one trace span.

Why not `asyncio.gather(*calls, return_exceptions=True)`: it starts every call at once (10,000
items are 10,000 tasks, and a rate limit refuses most of them), and cancelling one call cannot stop
the rest. Here a task is made only when a slot is free, and items are taken from `calls` only then,
so a generator of items is read as the work goes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol, TypeAlias, TypeVar

from keel.errors import KeelError

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an item of `map`

# One call: an awaitable not yet started (a coroutine), or a function of no arguments returning one
# (`lambda: keel.chat(...)`); the function is only called when the call's slot is free.
CallSpec: TypeAlias = Awaitable[T] | Callable[[], Awaitable[T]]


class CallCancelled(KeelError):
    """An item of a fan-out that did not finish because another item failed and `fail_fast=True`
    stopped the rest: cancelled while in flight (`started`) or never started."""

    status: ClassVar[int] = 499  # nginx's "client closed request": nobody is waiting for it any more
    type: ClassVar[str] = "cancelled_error"
    code: ClassVar[str | None] = "cancelled"

    def __init__(self, index: int, *, started: bool, cause_index: int | None, cause: BaseException | None) -> None:
        what = "cancelled while in flight" if started else "not started"
        if cause_index is None:
            why = "it was cancelled from inside the call"
            hint = "Run it again if you still need its answer."
        else:
            why = f"item {cause_index} failed first ({type(cause).__name__}: {cause}) and fail_fast=True stops the rest"
            hint = "Fix or retry that item, or pass fail_fast=False to let every item run."
        super().__init__(f"Item {index} was {what}: {why}. {hint}")
        self.index = index
        self.started = started
        self.cause_index = cause_index
        self.cause = cause


async def gather(
    calls: Iterable[CallSpec[T]], *, concurrency: int = 8, fail_fast: bool = False, progress: bool | str = False,
) -> list[T | Exception]:
    """Run `calls` with at most `concurrency` in flight; one result per item taken, in input order:
    its value, or the `Exception` it raised (returned, not raised).

    - `calls`: coroutines (`keel.chat(...)` not awaited) or functions of no arguments returning one
      (`lambda: keel.chat(...)`, built only when a slot is free: prefer them for long lists). Each
      call runs in a task of its own, so a contextvar one sets is not seen by the others.
    - `fail_fast=True`: the first error cancels the calls in flight and starts no more; their places
      hold a `CallCancelled`. From a list or tuple every item has a place (coroutines not started are
      closed); from an iterator the results end at the last item taken.
    - Cancelling the caller cancels every call in flight, waits for them to end, starts no more and
      closes the coroutines of a list not started, then raises `CancelledError`. A `BaseException`
      that is not an `Exception` (KeyboardInterrupt) does the same and is raised.
    - `progress=True` (or a description): a progress bar on stderr (rich).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1 (got {concurrency}): the number of calls in flight at once")
    return await _FanOut(calls, concurrency, fail_fast, progress).run()


async def map(  # `keel.map`: like the builtin, over items, but awaited and bounded
    fn: Callable[[I], Awaitable[T]], items: Iterable[I], *, concurrency: int = 8, fail_fast: bool = False,
    progress: bool | str = False,
) -> list[T | Exception]:
    """`fn(item)` for every item, with at most `concurrency` in flight; results as `gather` gives them.
    Items are taken from `items` only when a slot is free (a generator is read as the work goes)."""
    calls: Iterable[CallSpec[T]] = (_bind(fn, item) for item in items)
    if isinstance(items, Sized) and not isinstance(items, Iterator):  # keeps a list's "every item has a place"
        calls = list(calls)
    return await gather(calls, concurrency=concurrency, fail_fast=fail_fast, progress=progress)


class _Span(Protocol):
    def set_attributes(self, attributes: Mapping[str, Any]) -> None: ...


def describe(span: _Span | None, results: Sequence[object]) -> None:
    """What a fan-out did, on its trace span: how many items ran, and how many ended in an error."""
    if span is not None:
        span.set_attributes({
            "keel.parallel.items": len(results),
            "keel.parallel.errors": sum(isinstance(r, Exception) for r in results),
        })


def _bind(fn: Callable[[I], Awaitable[T]], item: I) -> Callable[[], Awaitable[T]]:
    return lambda: fn(item)


class _Pending:
    """The place of an item still running."""


_PENDING: Any = _Pending()


class _FanOut:
    """One `gather`: a feeder that starts a task per item when a slot is free, and their results."""

    def __init__(self, calls: Iterable[CallSpec[T]], concurrency: int, fail_fast: bool, progress: bool | str) -> None:
        self.calls = calls
        # A list or tuple: every item gets a place, and coroutines never started are closed.
        self.whole = isinstance(calls, Sized) and not isinstance(calls, Iterator)
        self.slots = asyncio.Semaphore(concurrency)
        self.fail_fast = fail_fast
        self.progress = progress
        self.results: list[Any] = []
        self.running: dict[asyncio.Task[Any], tuple[int, CallSpec[Any]]] = {}
        self.stopped_by: tuple[int, Exception] | None = None  # fail_fast: the item whose error stops the rest
        self.fatal: BaseException | None = None  # a KeyboardInterrupt or the like from a call
        self.advance: Callable[[], None] = _nothing

    async def run(self) -> list[Any]:
        iterator = iter(self.calls)
        try:
            with _progress_bar(self.progress, len(self.calls) if isinstance(self.calls, Sized) else None) as advance:
                self.advance = advance
                await self._feed(iterator)
                while self.running:  # the last ones
                    await asyncio.wait(list(self.running))
        except BaseException:  # cancelled, or a call's function raised: nothing is left running
            await self._cancel_running()
            self._close_rest(iterator)
            raise
        if self.fatal is not None:
            self._close_rest(iterator)
            raise self.fatal
        if self.stopped_by is not None and self.whole:
            self._mark_not_started(iterator, *self.stopped_by)
        return self.results

    async def _feed(self, iterator: Iterator[CallSpec[Any]]) -> None:
        """Take the next item only once a slot is free, so at most `concurrency` are ever taken ahead."""
        while True:
            await self.slots.acquire()
            if self.stopped_by is not None or self.fatal is not None:
                self.slots.release()
                return
            try:
                call = next(iterator)
            except StopIteration:
                self.slots.release()
                return
            except BaseException:  # the caller's iterator raised
                self.slots.release()
                raise
            task = asyncio.create_task(_run(call))
            self.running[task] = (len(self.results), call)
            self.results.append(_PENDING)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        index, call = self.running.pop(task)
        self.slots.release()
        self.advance()
        if task.cancelled():  # by fail_fast, or from inside the call itself: either way no answer
            _close(call)  # cancelled before its first step: a coroutine given as is never ran
            cause_index, cause = self.stopped_by or (None, None)
            self.results[index] = CallCancelled(index, started=True, cause_index=cause_index, cause=cause)
            return
        error = task.exception()
        if error is None:
            self.results[index] = task.result()
        elif not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not an item's error
            self.results[index] = error
            self.fatal = self.fatal or error
            self._cancel_others()
        else:
            self.results[index] = error
            if self.fail_fast and self.stopped_by is None:
                self.stopped_by = (index, error)
                self._cancel_others()

    def _cancel_others(self) -> None:
        for task in self.running:
            task.cancel()

    async def _cancel_running(self) -> None:
        """Cancel every call in flight and wait until each has ended: no task outlives the fan-out."""
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _close_rest(self, iterator: Iterator[CallSpec[Any]]) -> None:
        """Close the coroutines of a list's items not started; an iterator is not read any further."""
        if self.whole:
            for call in iterator:
                _close(call)

    def _mark_not_started(self, iterator: Iterator[CallSpec[Any]], cause_index: int, cause: Exception) -> None:
        """After fail_fast: a list's items never started get their place, their coroutines closed."""
        for call in iterator:
            _close(call)
            self.results.append(CallCancelled(len(self.results), started=False, cause_index=cause_index, cause=cause))


async def _run(call: CallSpec[T]) -> T:
    """One call in a task of its own; a function is called only here, once the task runs, so a call
    cancelled before it starts is never built (and a function that raises is that item's error)."""
    awaitable = call() if callable(call) and not inspect.isawaitable(call) else call
    return await awaitable


def _close(call: object) -> None:
    """Close a coroutine that will never run, so Python does not warn that it was never awaited."""
    if inspect.iscoroutine(call):
        call.close()


def _nothing() -> None:
    return None


@contextmanager
def _progress_bar(progress: bool | str, total: int | None) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr while the fan-out runs; yields what advances it (nothing when off)."""
    if not progress:
        yield _nothing
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task(progress if isinstance(progress, str) else "calls", total=total)
        yield lambda: bar.advance(task)
