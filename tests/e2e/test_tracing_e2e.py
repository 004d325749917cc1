"""Acceptance: calls join the caller's trace. Through a real `keel serve`, two chained calls sent
with one W3C `traceparent` are logged under its trace id, and the store holds their call spans
(children of the caller's span) with an attempt span under each, carrying the GenAI semantic
conventions' attributes. In-process, `keel.trace("chain")` around two `keel.chat` calls makes
one trace whose root is the chain span."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import GatewayProcess
from observability_helpers import (
    PRICING,
    REQUEST_ID,
    openai_deployment,
    read_records,
    read_spans,
    stop_and_flush,
    store_section,
    traceparent,
)
from openai.types.chat import ChatCompletionChunk as SDKChunk

from keel.config import parse_config
from keel.engine import Keel
from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer
from keel.types import ChatCompletion

KEY = "sk-keel-tracing-e2e-31d0"
UPSTREAM_MODEL = "gpt-4o-mini-2024-07-18"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FakeBehaviour(chunks=5)) as server:
        yield server


def config_for(upstream: FakeOpenAIServer, url: str, tmp: Path) -> dict[str, Any]:
    return {
        "server": {"graceful_timeout_s": 5},
        "models": [{"name": "gpt", "deployments": [openai_deployment("gpt-main", upstream.url)]}],
        "pricing": PRICING,
        "store": store_section(url, tmp),
    }


class GatewayTrace:
    def __init__(self, trace_id: str, parent_id: str, request_ids: list[str], refused_id: str,
                 records: dict[str, dict[str, Any]], spans: list[dict[str, Any]], unsampled: tuple[str, str]) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.request_ids = request_ids  # the two chained calls, in order
        self.refused_id = refused_id  # a body that is not JSON, sent with the same traceparent
        self.records = records
        self.spans = spans
        self.unsampled = unsampled  # (trace id, request id) of a call whose traceparent is not sampled

    def call_spans(self) -> list[dict[str, Any]]:
        by_id = {span["span_id"]: span for span in self.spans}
        return [by_id[self.records[rid]["span_id"]] for rid in self.request_ids]


@pytest.fixture(scope="module")
def gateway_trace(upstream: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> GatewayTrace:
    tmp = tmp_path_factory.mktemp("tracing")
    url = f"sqlite:///{tmp}/log.db"
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    headers = {"traceparent": traceparent(trace_id, parent_id), "tracestate": "caller=e2e"}
    gw = GatewayProcess(config_for(upstream, url, tmp), tmp, env={"KEEL_MASTER_KEY": KEY}).start()
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=20)
        question = [{"role": "user", "content": "what is a trace"}]
        first = client.chat.completions.with_raw_response.create(
            model="gpt", messages=question, extra_headers=headers,  # type: ignore[arg-type]
        )
        answer = first.parse().choices[0].message.content
        follow_up = [*question, {"role": "assistant", "content": answer}, {"role": "user", "content": "and a span"}]
        second = client.chat.completions.with_raw_response.create(
            model="gpt", messages=follow_up, stream=True, extra_headers=headers,  # type: ignore[arg-type]
        )
        chunks: openai.Stream[SDKChunk] = second.parse()  # type: ignore[assignment]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: and a span"
        refused = httpx.post(gw.url + "/v1/chat/completions", content=b"{not json",
                             headers={"authorization": f"Bearer {KEY}", **headers})
        assert refused.status_code == 400
        quiet_trace = os.urandom(16).hex()
        quiet = client.chat.completions.with_raw_response.create(
            model="gpt", messages=question,  # type: ignore[arg-type]
            extra_headers={"traceparent": f"00-{quiet_trace}-{os.urandom(8).hex()}-00"},
        )
        client.close()
    finally:
        exits = stop_and_flush(gw)
    assert exits == [0], gw.log()[-3000:]
    ids = [first.headers[REQUEST_ID], second.headers[REQUEST_ID]]
    records = {row["request_id"]: row for row in read_records(url)}
    return GatewayTrace(trace_id, parent_id, ids, refused.headers[REQUEST_ID], records, read_spans(url, trace_id),
                        (quiet_trace, quiet.headers[REQUEST_ID]))


# ---------------------------------------------------------------------------- the gateway


def test_both_chained_calls_are_logged_under_the_callers_trace_id(gateway_trace: GatewayTrace) -> None:
    records = [gateway_trace.records[rid] for rid in gateway_trace.request_ids]
    assert [r["trace_id"] for r in records] == [gateway_trace.trace_id] * 2
    assert all(r["outcome"] == "ok" for r in records)
    span_ids = [r["span_id"] for r in records]
    assert all(span_ids) and len(set(span_ids)) == 2 and gateway_trace.parent_id not in span_ids


def test_a_call_refused_before_the_pipeline_still_carries_the_callers_trace_id(gateway_trace: GatewayTrace) -> None:
    refused = gateway_trace.records[gateway_trace.refused_id]
    assert refused["outcome"] == "invalid" and refused["trace_id"] == gateway_trace.trace_id


def test_a_call_in_an_unsampled_trace_is_still_logged_under_its_trace_id(gateway_trace: GatewayTrace) -> None:
    trace_id, request_id = gateway_trace.unsampled
    record = gateway_trace.records[request_id]
    assert record["outcome"] == "ok" and record["trace_id"] == trace_id


def test_each_call_span_is_a_child_of_the_callers_span(gateway_trace: GatewayTrace) -> None:
    assert all(span["trace_id"] == gateway_trace.trace_id for span in gateway_trace.spans)
    for span, rid in zip(gateway_trace.call_spans(), gateway_trace.request_ids, strict=True):
        assert span["parent_id"] == gateway_trace.parent_id
        assert span["request_id"] == rid
        assert span["status"] != "error"
        assert span["started_at"] <= span["ended_at"]


def attempts_under(spans: list[dict[str, Any]], call: dict[str, Any]) -> list[dict[str, Any]]:
    """The upstream attempt spans among a call span's children (other stages may add spans of their own)."""
    children = [s for s in spans if s["parent_id"] == call["span_id"]]
    return [s for s in children if "gpt-main" in s["name"] or "gpt-main" in s["attributes"].values()]


def descends_from(spans: list[dict[str, Any]], span: dict[str, Any], ancestor: str) -> bool:
    by_id = {s["span_id"]: s for s in spans}
    parent: str | None = span["parent_id"]
    while parent is not None and parent != ancestor:
        parent = by_id[parent]["parent_id"] if parent in by_id else None
    return parent == ancestor


def test_each_call_span_has_its_upstream_attempt_span_under_it(gateway_trace: GatewayTrace) -> None:
    for call in gateway_trace.call_spans():
        (attempt,) = attempts_under(gateway_trace.spans, call)
        assert attempt["attributes"]["gen_ai.operation.name"] == "chat"
        assert attempt["status"] != "error"
        assert call["started_at"] <= attempt["started_at"] <= attempt["ended_at"] <= call["ended_at"] + 1e-3
    # The caller's span is not Keel's to store: every stored span descends from it.
    assert all(descends_from(gateway_trace.spans, s, gateway_trace.parent_id) for s in gateway_trace.spans)


def test_call_spans_carry_the_genai_attributes(gateway_trace: GatewayTrace) -> None:
    for span, rid in zip(gateway_trace.call_spans(), gateway_trace.request_ids, strict=True):
        record, attributes = gateway_trace.records[rid], span["attributes"]
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.request.model"] == "gpt"
        assert attributes["gen_ai.response.model"] == UPSTREAM_MODEL
        assert attributes["gen_ai.usage.input_tokens"] == record["prompt_tokens"] > 0
        assert attributes["gen_ai.usage.output_tokens"] == record["completion_tokens"] > 0
        assert attributes.get("gen_ai.provider.name", attributes.get("gen_ai.system")) == "openai"
        assert attributes["gen_ai.response.finish_reasons"] == ["stop"]


# ---------------------------------------------------------------------------- the library


async def test_keel_trace_makes_one_trace_with_the_chain_span_as_parent(
    fake_upstream: FakeOpenAIServer, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/library.db"
    keel = Keel(parse_config(config_for(fake_upstream, url, tmp_path)))
    try:
        with keel.trace("chain", step="answer"):
            first = await keel.chat(model="gpt", messages=[{"role": "user", "content": "first step"}])
            second = await keel.chat(model="gpt", messages=[{"role": "user", "content": "second step"}])
    finally:
        await keel.close()
    assert isinstance(first, ChatCompletion) and isinstance(second, ChatCompletion)
    assert [first.choices[0].message.content, second.choices[0].message.content] == [
        "echo: first step", "echo: second step",
    ]
    records = read_records(url)
    assert len(records) == 2
    (trace_id,) = {r["trace_id"] for r in records}
    assert trace_id is not None
    spans = read_spans(url, trace_id)
    (chain,) = [s for s in spans if s["name"] == "chain"]
    assert chain["parent_id"] is None and chain["attributes"].get("step") == "answer"
    by_id = {s["span_id"]: s for s in spans}
    for record in records:
        call = by_id[record["span_id"]]
        assert call["parent_id"] == chain["span_id"]
        assert chain["started_at"] <= call["started_at"] <= call["ended_at"] <= chain["ended_at"]
        assert len(attempts_under(spans, call)) == 1
    assert all(descends_from(spans, s, chain["span_id"]) for s in spans if s is not chain)
