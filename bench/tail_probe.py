"""`keel serve` with instruments, to attribute latency stalls to what caused them.

    .venv/bin/python bench/tail_probe.py OUT.json -- serve --config keel.yaml --port 8080

Runs the ordinary `keel serve` in this process, with three recorders whose findings are
written to OUT.json when the process exits (SIGTERM is enough):
- the event loop's lag: a task that asks to wake every millisecond and notes how late it woke
  (every lag over 2 ms, with its start time);
- garbage collections: `gc.callbacks`, the duration of each collection per generation;
- the request log writer's batches: when each `_drain` ran and for how long, and how many rows.

With KEEL_PROBE_UNTUNED=1 in the environment, the interpreter settings of `keel.server.runtime`
are left out (the "before"). Each recorder costs the loop little (a wake-up a millisecond) and is
the same in every run it is compared with; it is a diagnosis tool, not part of
`bench/overhead.py`'s figures.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

LAG_FLOOR_S = 0.002

lags: list[tuple[float, float, float, float]] = []  # (started, lag, loop CPU, writer CPU), seconds
collections: list[tuple[int, float, float, float]] = []  # (generation, started, seconds, CPU seconds)
drains: list[tuple[float, float, int, int, float]] = []  # (started, seconds, rows, queue depth, CPU seconds)
_gc_started = (0.0, 0.0)
counts: dict[str, list[int]] = {}


def on_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = (time.perf_counter(), time.thread_time())
    else:
        wall, cpu = time.perf_counter() - _gc_started[0], time.thread_time() - _gc_started[1]
        collections.append((info["generation"], _gc_started[0], wall, cpu))


def writer_cpu() -> float:
    """CPU seconds of the request log writer's thread so far (0 before it starts)."""
    for thread in threading.enumerate():
        if thread.name == "keel-request-log" and thread.ident is not None:
            try:
                return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except OSError:
                return 0.0
    return 0.0


_beat = [0.0]  # when the loop last woke the lag watcher
stacks: list[tuple[float, float, list[str]]] = []  # (when, loop silent for, the loop thread's stack)
STACK_AFTER_S = 0.008


def watch_stacks(loop_thread: int) -> None:
    """From a thread of its own: when the loop has not woken for STACK_AFTER_S, what its thread is
    running (once per stall). Taking the GIL to look is the switch interval's business, so a stall
    spent in one long Python call is caught in it; one the OS caused shows the loop idle."""
    seen = 0.0
    while True:
        time.sleep(0.002)
        beat = _beat[0]
        silent = time.perf_counter() - beat
        if beat and silent > STACK_AFTER_S and beat != seen:
            seen = beat
            frame = sys._current_frames().get(loop_thread)
            lines = []
            while frame is not None and len(lines) < 12:
                code = frame.f_code
                lines.append(f"{code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {code.co_name}")
                frame = frame.f_back
            stacks.append((beat, silent, lines))


async def watch_lag() -> None:
    """Each lag with what ran meanwhile: the loop's own thread (a long callback, a collection),
    the writer's thread (holding the GIL), or neither (the OS ran another process)."""
    clock, own = time.perf_counter, time.thread_time
    threading.Thread(target=watch_stacks, args=(threading.get_ident(),), daemon=True).start()
    while True:
        before, own_before, writer_before = clock(), own(), writer_cpu()
        _beat[0] = before
        await asyncio.sleep(0.001)
        late = clock() - before - 0.001
        if late > LAG_FLOOR_S:
            lags.append((before, late, own() - own_before, writer_cpu() - writer_before))


def instrument_writer() -> None:
    from keel.observability import writer

    original = writer.RecordWriter._drain

    def timed(self: writer.RecordWriter, limit: int) -> None:
        depth = len(self._queue)
        started, cpu = time.perf_counter(), time.thread_time()
        original(self, limit)
        if depth:
            drains.append((started, time.perf_counter() - started, min(limit, depth), depth, time.thread_time() - cpu))

    writer.RecordWriter._drain = timed  # type: ignore[method-assign]


def instrument_app() -> None:
    """Start the lag watcher with the server's lifespan, on uvicorn's own loop."""
    import keel.server as server

    create_app = server.create_app

    def create(keel: Any) -> Any:
        app = create_app(keel)

        async def probed(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                asyncio.get_running_loop().create_task(watch_lag())
                counts["at_start"] = [len(gc.get_objects(g)) for g in (0, 1, 2)]
            await app(scope, receive, send)

        return probed

    server.create_app = create  # type: ignore[assignment]


def dump(path: Path) -> None:
    counts["at_end"] = [len(gc.get_objects(g)) for g in (0, 1, 2)]
    counts["frozen"] = [gc.get_freeze_count()]
    path.write_bytes(orjson.dumps(
        {"lags": lags, "collections": collections, "drains": drains, "counts": counts, "stacks": stacks}
    ))


def main() -> None:
    out, _, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    if os.environ.get("KEEL_PROBE_UNTUNED"):
        from untuned_serve import untune

        untune()
    atexit.register(dump, Path(out))
    gc.callbacks.append(on_gc)
    instrument_writer()
    instrument_app()
    from keel.cli import app

    sys.argv = ["keel", *argv]
    app()


if __name__ == "__main__":
    main()
