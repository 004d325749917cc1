"""Structured outputs: what the validation stage buys and what it costs, on the simulated provider.

    .venv/bin/python bench/structured.py [--calls 400] [--rate 0.3] [--latency-ms 20]

A simulated deployment answers `response_format: json_schema` requests (and forced tool calls) after a
fixed latency, and sends a share of its JSON answers broken on purpose (`invalid_json_rate`: half cut
short, half with a wrong-typed value; seeded, so every row sees the same draws). The same calls run
with validation off and on (`max_repairs: 2`, one deployment), at a rate of 0 and at `--rate`.

Per row: the share of calls that end with a valid answer (checked by the same code, for the rows with
validation off too), the share refused with 422 `invalid_output` (never a silently invalid answer), the
upstream attempts per call beyond the first (repairs), latency p50/p99/mean per call, and cost per call
(the discarded answers included), with their ratios against validation off at the same rate. The
in-process library is used, so the figures are the pipeline's, with no HTTP in between.

Then the embedded model (SmolLM2 on llama.cpp, `--local-calls` per schema on three small schemas,
validation on, `max_repairs: 2`, temperature 0.7 with a seed per call) with its JSON-schema grammar
and without it (the provider's private `_grammar` flag, for this bench only: no user setting turns
the grammar off). Skipped when the embedded model is not installed; `--local-calls 0` skips it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.config import parse_config
from keel.engine import Keel
from keel.errors import InvalidOutput, ModelNotLoaded
from keel.pipeline import Completion, Context
from keel.types import ChatRequest
from keel.validation.answer import expectations, problems
from keel.validation.schema import SchemaCache

SCHEMA = {"type": "object", "required": ["title", "year", "tags"], "additionalProperties": False, "properties": {
    "title": {"type": "string"}, "year": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}
JSON_BODY = {"model": "m", "messages": [{"role": "user", "content": "Describe a film as JSON."}],
             "response_format": {"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA}}}
TOOL_BODY = {"model": "m", "messages": [{"role": "user", "content": "Find the film."}], "tool_choice": "required",
             "tools": [{"type": "function", "function": {"name": "find_film", "parameters": SCHEMA}}]}


@dataclass
class Row:
    label: str
    latencies: list[float] = field(default_factory=list)
    valid: int = 0
    refused: int = 0
    repairs: int = 0
    nanos: int = 0

    @property
    def calls(self) -> int:
        return len(self.latencies)


async def run(label: str, body: dict[str, Any], *, rate: float, enabled: bool, calls: int, latency_ms: float,
              store: Path) -> Row:
    config = parse_config({
        "models": [{"name": "m", "validation": {"enabled": enabled, "max_repairs": 2}, "deployments": [{
            "provider": "simulated", "invalid_json_rate": rate, "seed": 12, "latency_ms": latency_ms,
            "price": {"input": 0.15, "output": 0.60}}]}],
        "store": {"url": f"sqlite:///{store / (label.replace(' ', '_') + '.db')}", "log_content": False},
    })
    request = ChatRequest.model_validate(body)
    expect = expectations(request, SchemaCache())
    row = Row(label)
    async with Keel(config) as keel:
        for _ in range(calls):
            ctx = Context()
            started = time.perf_counter()
            try:
                reply = await keel.handle(request, ctx)
            except InvalidOutput:
                row.refused += 1
            else:
                assert isinstance(reply, Completion)
                row.valid += not problems(expect, reply.body)
            row.latencies.append(time.perf_counter() - started)
            row.repairs += max(0, len(ctx.attempts) - 1)
            row.nanos += ctx.cost.nanos
    return row


LOCAL_SCHEMAS: dict[str, dict[str, Any]] = {
    "colour": {"type": "object", "required": ["colour"], "additionalProperties": False,
               "properties": {"colour": {"type": "string", "maxLength": 12}}},
    "count": {"type": "object", "required": ["item", "count"], "additionalProperties": False,
              "properties": {"item": {"type": "string", "maxLength": 12},
                             "count": {"type": "integer", "minimum": 0, "maximum": 9}}},
    "flags": {"type": "object", "required": ["ok", "tags"], "additionalProperties": False,
              "properties": {"ok": {"type": "boolean"},
                             "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}}},
}


async def run_local(label: str, *, grammar: bool, calls: int, store: Path) -> Row:
    """The embedded model on each small schema, validation on, with or without its grammar."""
    from keel.providers.local import LocalProvider

    config = parse_config({
        "models": [{"name": "m", "validation": {"max_repairs": 2}, "deployments": [{"provider": "local"}]}],
        "store": {"url": f"sqlite:///{store / (label.replace(' ', '_') + '.db')}", "log_content": False},
    })
    row = Row(label)
    LocalProvider._grammar = grammar
    try:
        async with Keel(config) as keel:
            for name, schema in LOCAL_SCHEMAS.items():
                request = ChatRequest.model_validate({
                    "model": "m", "max_tokens": 60, "temperature": 0.7,
                    "messages": [{"role": "user",
                                  "content": f"Answer as JSON with the keys {sorted(schema['properties'])}."}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}})
                expect = expectations(request, SchemaCache())
                for seed in range(calls):
                    ctx = Context()
                    started = time.perf_counter()
                    try:
                        reply = await keel.handle(request.model_copy(update={"seed": seed}), ctx)
                    except InvalidOutput:
                        row.refused += 1
                    else:
                        assert isinstance(reply, Completion)
                        row.valid += not problems(expect, reply.body)
                    row.latencies.append(time.perf_counter() - started)
                    row.repairs += max(0, len(ctx.attempts) - 1)
    finally:
        LocalProvider._grammar = True
    return row


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(rows: list[tuple[Row, Row]]) -> None:
    print(f"{'case':<38} {'valid':>6} {'422':>5} {'repairs/call':>12} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'mean ms':>7} {'mean x':>6} {'cost/call $':>12} {'cost x':>7}")
    for row, base in rows:
        mean, base_mean = statistics.fmean(row.latencies), statistics.fmean(base.latencies)
        cost, base_cost = row.nanos / row.calls / 1e9, base.nanos / base.calls / 1e9
        print(f"{row.label:<38} {row.valid / row.calls:>6.1%} {row.refused / row.calls:>5.1%} "
              f"{row.repairs / row.calls:>12.2f} {statistics.median(row.latencies) * 1000:>7.1f} "
              f"{p(row.latencies, 0.99) * 1000:>7.1f} {mean * 1000:>7.1f} {mean / base_mean:>6.2f} "
              f"{cost:>12.3e} {cost / base_cost if base_cost else 0:>7.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rate", type=float, default=0.3, help="invalid_json_rate of the simulated deployment")
    parser.add_argument("--latency-ms", type=float, default=20, help="the simulated upstream's latency")
    parser.add_argument("--local-calls", type=int, default=3, help="embedded model calls per schema and row")
    args = parser.parse_args()
    print(f"{args.calls} calls per row, simulated upstream latency {args.latency_ms:g} ms, max_repairs 2; "
          "x columns: against validation off at the same rate")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for kind, body in (("json_schema", JSON_BODY), ("tool call", TOOL_BODY)):
            for rate in (0.0, args.rate):
                off, on = [await run(f"{kind}, rate {rate:g}, validation {state}", body, rate=rate,
                                     enabled=state == "on", calls=args.calls, latency_ms=args.latency_ms,
                                     store=Path(tmp)) for state in ("off", "on")]
                rows += [(off, off), (on, off)]
        table(rows)
        if args.local_calls > 0:
            try:
                with_grammar = await run_local("embedded, grammar on", grammar=True, calls=args.local_calls,
                                               store=Path(tmp))
                without = await run_local("embedded, grammar off", grammar=False, calls=args.local_calls,
                                          store=Path(tmp))
            except ModelNotLoaded as exc:
                print(f"embedded model rows skipped: {exc.message}")
            else:
                print(f"\nembedded model, {args.local_calls} calls x {len(LOCAL_SCHEMAS)} schemas, validation on, "
                      "max_repairs 2; x columns: against grammar off")
                table([(without, without), (with_grammar, without)])


if __name__ == "__main__":
    asyncio.run(main())
