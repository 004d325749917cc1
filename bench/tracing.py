"""What tracing costs a call: the observe stage with tracing off, with spans to the store, with
spans to the store and OTLP, and with Keel's tracing as it was at `--baseline` (OpenTelemetry SDK
spans on the request path, loaded from git with `git show`), all in one run.

    .venv/bin/python bench/tracing.py [--calls 200] [--repeats 100] [--baseline REV]

Each figure is the median over `repeats` of (time for `calls` calls) / `calls`, timeit-style:
the scenarios take turns batch by batch (short batches, many of them) so a noisy machine hurts
them alike, and the garbage collector is collected before and paused during each batch. A call is the observe stage
around an inner stage that records one upstream attempt and answers at once (no provider, no
network): what is measured is the observe stage's own work, the request record and the metrics
included, with a sink that keeps what it is given. The traced call makes two spans (the call and
its attempt), like a call answered by its first deployment. The OTLP scenario sends to a local
HTTP server that discards what it receives; the export runs on a background thread, so its row
is the request path's cost with that thread competing for the same cores (spans beyond its queue
are dropped and counted, as in production).
Also timed: `trace("step")` as an empty `with` block, and one bare SDK span (start + end).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.server
import statistics
import subprocess
import threading
import time
import types
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from opentelemetry.sdk.trace import TracerProvider

from keel.config import KeelConfig, TracingConfig
from keel.engine import Keel
from keel.observability.metrics import Metrics
from keel.observability.record import RequestRecord, SpanRecord
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing
from keel.pipeline import Attempt, Call, Completion, Context, Reply
from keel.types import ChatRequest

ROOT = Path(__file__).resolve().parents[1]
# The last commit whose tracing made OpenTelemetry SDK spans on the request path.
BASELINE = "0f4f72d"
ANSWER: dict[str, Any] = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Benchmarks measure."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}


class Sink:
    """Keeps what it is given (cleared between batches), like the writer's queue."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.spans: list[SpanRecord] = []

    def submit(self, record: RequestRecord) -> None:
        self.records.append(record)

    def submit_span(self, span: SpanRecord) -> None:
        self.spans.append(span)

    def clear(self) -> None:
        self.records.clear()
        self.spans.clear()


async def answer(call: Call) -> Reply:
    """The upstream: one attempt, answered at once."""
    now = time.monotonic()
    call.ctx.attempts.append(Attempt(call.deployments[0].name, now, now))
    call.ctx.deployment = call.deployments[0].name
    return Completion(ANSWER)


def baseline_tracing(rev: str) -> type[Any] | None:
    """`Tracing` as Keel had it at `rev` (OpenTelemetry SDK spans on the request path), loaded from
    git without touching the working tree; None when git or the revision is not there."""
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:src/keel/observability/tracing.py"],
            capture_output=True, check=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("keel_tracing_baseline")
    exec(compile(source, f"{rev}:tracing.py", "exec"), module.__dict__)
    return cast(type[Any], module.Tracing)


class Discard(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def batch(observe: Observe, sink: Sink, make_call: Callable[[], Call], calls: int) -> float:
    """Seconds per call for `calls` calls through the observe stage."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        for _ in range(calls):
            await observe(make_call(), answer)
        elapsed = time.perf_counter() - started
    finally:
        gc.enable()
    assert len(sink.records) == calls
    sink.clear()
    return elapsed / calls


def timed(function: Callable[[], Any], calls: int) -> float:
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        for _ in range(calls):
            function()
        return (time.perf_counter() - started) / calls
    finally:
        gc.enable()


async def main(calls: int, repeats: int, baseline: str) -> None:
    config = KeelConfig.model_validate({"models": [{"name": "chat", "deployments": [
        {"provider": "openai", "name": "primary", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}]}]})
    model, deployments = Keel(config).resolve("chat")
    request = ChatRequest.model_validate({
        "model": "chat", "max_tokens": 64, "temperature": 0.2,
        "messages": [{"role": "user", "content": "Say something about benchmarks, please."}],
    })

    def make_call() -> Call:
        return Call(request=request, model=model, deployments=deployments, ctx=Context(feature="bench"))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Discard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"

    sinks: dict[str, Sink] = {}
    observers: dict[str, Observe] = {}
    closers: list[Callable[[], None]] = []
    scenarios: dict[str, Callable[[Sink], Any]] = {
        "tracing off": lambda sink: Tracing(TracingConfig(to_store=False), sink),
        "spans to the store": lambda sink: Tracing(TracingConfig(), sink),
        "store + OTLP export": lambda sink: Tracing(TracingConfig(otlp_endpoint=endpoint), sink),
    }
    if (old := baseline_tracing(baseline)) is not None:
        scenarios[f"SDK spans to the store ({baseline})"] = lambda sink: old(TracingConfig(), sink)
    else:
        print(f"(no baseline: git show {baseline} failed)")
    for name, make in scenarios.items():
        sinks[name] = sink = Sink()
        tracer = make(sink)
        closers.append(tracer.shutdown)
        observers[name] = Observe(sink, tracer, Metrics())

    tracing = Tracing(TracingConfig(), Sink())
    sdk_tracer = TracerProvider(shutdown_on_exit=False).get_tracer("bench")

    def empty_trace() -> None:
        with tracing.trace("step"):
            pass

    def bare_sdk_span() -> None:
        sdk_tracer.start_span("step").end()

    results: dict[str, list[float]] = {name: [] for name in [*scenarios, "trace('step') block", "bare SDK span"]}
    for name in scenarios:  # warm up
        await batch(observers[name], sinks[name], make_call, max(calls // 10, 10))
    exporter = observers["store + OTLP export"].tracing.exporter
    assert exporter is not None
    names = list(scenarios)
    for repeat in range(repeats):
        turn = repeat % len(names)
        for name in names[turn:] + names[:turn]:  # each scenario goes first as often as the others
            results[name].append(await batch(observers[name], sinks[name], make_call, calls))
        exporter.flush()  # what the export thread has not sent yet, outside the timed batches
        results["trace('step') block"].append(timed(empty_trace, calls))
        results["bare SDK span"].append(timed(bare_sdk_span, calls))
    for close in closers:
        await asyncio.to_thread(close)
    server.shutdown()

    off = statistics.median(results["tracing off"])
    print(f"per call, median of {repeats} x {calls} calls (us); 'added' is over tracing off")
    for name, values in results.items():
        median = statistics.median(values)
        added = f"  added {(median - off) * 1e6:7.1f}" if name in scenarios and name != "tracing off" else ""
        print(f"  {name:<34} {median * 1e6:8.1f}{added}   (min {min(values) * 1e6:.1f}, max {max(values) * 1e6:.1f})")
    print(f"OTLP: {exporter.dropped} spans dropped (queue full)")


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed batch")
    parser.add_argument("--repeats", type=int, default=100, help="batches per scenario")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the SDK-span tracing to compare")
    args = parser.parse_args()
    run(main(args.calls, args.repeats, args.baseline))
