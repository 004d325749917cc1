"""Acceptance: every call that reaches a real `keel serve` leaves exactly one request record,
with the fields its outcome calls for, on SQLite and on the real PostgreSQL.

One scripted run per store, through the official `openai` SDK (its retries off): answered
calls plain and streamed, upstream failures, budget refusals, bad JSON, unknown models, streams
the client closes early, over-long tags. The gateway is stopped with SIGTERM (shutdown flushes
the log) and the records are read back with `RecordStore.records`. The costs come from keel.yaml's
`pricing:`; a streamed call costs what the same plain call costs, and a stream whose upstream
sent no usage is charged an estimate, marked as one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import DATA, GatewayProcess, fresh_pg_database
from observability_helpers import (
    PRICING,
    REQUEST_ID,
    assert_openai_error,
    expected_nanos,
    fake_prompt_tokens,
    key_id_of,
    openai_deployment,
    read_records,
    stop_and_flush,
    store_section,
    wait_until_counted,
)

from keel.observability.record import MAX_METADATA_CHARS, MAX_TAG_CHARS
from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

KEY = "sk-keel-request-log-e2e-5f2a"
WRONG_KEY = "sk-not-the-gateway-key-0c9e"
N = 3  # calls of each outcome
UPSTREAM_MODEL = "gpt-4o-mini-2024-07-18"  # what the fake upstream answers with
# The fake streams an answer in `chunks` pieces and counts one completion token per piece; a plain
# answer counts one per word. "echo: " and seven words are eight: with eight chunks both count alike.
COST_CHUNKS = 8
COST_MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "one two three four five six seven"}]
# A recorded OpenAI stream (plain text, gpt-4o) with its usage chunk taken out.
TRANSCRIPT = DATA / "openai-sse" / "e2aad469b71d1d4894ff833ea147020a9d875eb7ce644a0ff355581690a4cbfd.bin"
LONG = 10_000
UNPRICED_MODEL = "mystery-model-7"

OUTCOME = {
    "plain": ("ok", 200, None),
    "stream": ("ok", 200, None),
    "failed": ("error", 502, "upstream_server_error"),
    "budget": ("budget_exceeded", 429, "budget_exceeded"),
    "bad_json": ("invalid", 400, "invalid_json"),
    "unknown_model": ("invalid", 404, "model_not_found"),
    "unknown_model_tags": ("invalid", 404, "model_not_found"),
    "bad_key": ("invalid", 401, "invalid_api_key"),
    "closed": ("client_closed", 499, "client_closed"),
    "long_header": ("ok", 200, None),
    "long_metadata": ("ok", 200, None),
    "cost_plain": ("ok", 200, None),
    "cost_stream": ("ok", 200, None),
    "no_usage": ("ok", 200, None),
    "unpriced": ("ok", 200, None),
}
ANSWERED = ("plain", "stream", "cost_plain", "cost_stream", "long_header", "long_metadata")


@dataclass
class Sent:
    """One call as the client made it and saw it end."""

    kind: str
    request_id: str
    status: int
    model: str | None
    stream: bool = False
    feature: str | None = None
    user: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    answer: str | None = None
    usage: dict[str, Any] | None = None  # as the client received it


@dataclass
class LogRun:
    variant: str
    log_content: bool
    sent: list[Sent]
    rows: list[dict[str, Any]]
    config_path: Path

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        return {row["request_id"]: row for row in self.rows}

    def of(self, *kinds: str) -> list[tuple[Sent, dict[str, Any]]]:
        records = self.records
        found = [(s, records[s.request_id]) for s in self.sent if s.kind in kinds]
        assert found, f"no call of kind {kinds} was made"
        return found


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FakeOpenAIServer]]:
    tmp = tmp_path_factory.mktemp("log-upstreams")
    no_usage = tmp / "no-usage.sse"
    events = TRANSCRIPT.read_bytes().split(b"\n\n")
    no_usage.write_bytes(b"\n\n".join(e for e in events if b'"usage":{' not in e))
    behaviours = {
        "ok": FakeBehaviour(chunks=COST_CHUNKS),
        "slow": FakeBehaviour(chunks=600, chunk_delay_ms=100),  # a minute: only closing it ends it sooner
        "broken": FakeBehaviour(fail_rate=1.0, fail_status=500),
        "replay": FakeBehaviour(replay=str(no_usage)),
        "mystery": FakeBehaviour(model=UNPRICED_MODEL),  # a model no price table knows
    }
    servers = {name: FakeOpenAIServer(b).start() for name, b in behaviours.items()}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with fresh_pg_database("keel_e2e_log") as url:
        yield url


def gateway_config(upstreams: dict[str, FakeOpenAIServer], store: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"graceful_timeout_s": 5},
        "models": [
            {"name": "gpt", "deployments": [openai_deployment("gpt-main", upstreams["ok"].url)]},
            {"name": "slow", "deployments": [openai_deployment("slow-main", upstreams["slow"].url)]},
            {"name": "broken", "retry": {"max_attempts": 1},
             "deployments": [openai_deployment("broken-main", upstreams["broken"].url)]},
            {"name": "replayed", "deployments": [openai_deployment("replay-main", upstreams["replay"].url, "gpt-4o")]},
            {"name": "mystery", "deployments": [
                openai_deployment("mystery-main", upstreams["mystery"].url, UNPRICED_MODEL)]},
        ],
        "pricing": PRICING,
        # Any call tagged "capped" could cost more than this (its worst case): refused before it runs.
        "budgets": [{"scope": "feature", "match": "capped", "window": "total", "limit_usd": 0.000001}],
        "store": store,
    }


@pytest.fixture(scope="module", params=["sqlite", "postgres", "sqlite-no-content"])
def run(
    request: pytest.FixtureRequest, upstreams: dict[str, FakeOpenAIServer], tmp_path_factory: pytest.TempPathFactory
) -> LogRun:
    """One gateway per store: the scripted calls, SIGTERM, then the records it flushed."""
    variant: str = request.param
    tmp = tmp_path_factory.mktemp(f"log-{variant}")
    url = request.getfixturevalue("pg_url") if variant == "postgres" else f"sqlite:///{tmp}/log.db"
    log_content = variant != "sqlite-no-content"
    config = gateway_config(upstreams, store_section(url, tmp, log_content=log_content))
    started = time.time()
    gw = GatewayProcess(config, tmp, env={"KEEL_MASTER_KEY": KEY}).start()
    try:
        sent = drive(gw)
    finally:
        exits = stop_and_flush(gw)
    assert exits == [0], f"keel serve exited {exits}:\n{gw.log()[-3000:]}"
    return LogRun(variant, log_content, sent, read_records(url, since=started - 1), gw.config_path)


# ---------------------------------------------------------------------------- the scripted calls


def expect_error(call: Callable[[], Any]) -> openai.APIStatusError:
    try:
        call()
    except openai.APIStatusError as error:
        return error
    raise AssertionError("the call was expected to fail")


def params(
    model: str, messages: list[dict[str, Any]], feature: str | None, user: str | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """Keyword arguments of `chat.completions.create`: the feature tag as the x-keel-feature header."""
    out: dict[str, Any] = {"model": model, "messages": messages, **extra}
    if user is not None:
        out["user"] = user
    if feature is not None:
        out["extra_headers"] = {"x-keel-feature": feature}
    return out


def tagged(feature: str | None, extra: dict[str, Any]) -> str | None:
    """The feature a call is tagged with: its x-keel-feature header, else its metadata's "feature"."""
    return feature or (extra.get("metadata") or {}).get("feature")


def drive(gw: GatewayProcess) -> list[Sent]:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    stranger = openai.OpenAI(base_url=gw.url + "/v1", api_key=WRONG_KEY, max_retries=0, timeout=30)
    chat = client.chat.completions
    sent: list[Sent] = []

    def plain(kind: str, messages: list[dict[str, Any]], feature: str | None = None, user: str | None = None,
              **extra: Any) -> None:
        raw = chat.with_raw_response.create(**params("gpt", messages, feature, user, extra))
        completion = raw.parse()
        sent.append(Sent(kind, raw.headers[REQUEST_ID], 200, "gpt", False, tagged(feature, extra), user, messages,
                         completion.choices[0].message.content,
                         completion.usage.model_dump() if completion.usage else None))

    def streamed(kind: str, model: str, messages: list[dict[str, Any]], user: str | None = None, **extra: Any) -> None:
        raw = chat.with_raw_response.create(**params(model, messages, None, user, {"stream": True, **extra}))
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = next((c.usage.model_dump() for c in chunks if c.usage), None)
        sent.append(Sent(kind, raw.headers[REQUEST_ID], 200, model, True, tagged(None, extra), user, messages, text,
                         usage))

    def refused(kind: str, model: str, status: int, code: str, feature: str | None = None, user: str | None = None,
                sdk: openai.OpenAI = client, **extra: Any) -> None:
        messages = [{"role": "user", "content": f"{kind} call"}]
        error = expect_error(lambda: sdk.chat.completions.create(**params(model, messages, feature, user, extra)))
        assert error.status_code == status, error.response.text
        assert_openai_error(error.response.json(), code)
        sent.append(Sent(kind, error.response.headers[REQUEST_ID], status, model, False, tagged(feature, extra), user,
                         messages))

    for i in range(N):
        plain("plain", [{"role": "user", "content": f"plain call {i}"}], "from-header", f"user-plain-{i}")
        streamed("stream", "gpt", [{"role": "user", "content": f"streamed call {i}"}], f"user-stream-{i}",
                 metadata={"feature": "from-metadata"}, stream_options={"include_usage": True})
        refused("failed", "broken", 502, "upstream_server_error", "failing", f"user-failed-{i}")
        refused("budget", "gpt", 429, "budget_exceeded", "capped", f"user-budget-{i}")
        refused("unknown_model", "no-such-model", 404, "model_not_found", "unknown-model")
        refused("bad_key", "gpt", 401, "invalid_api_key", "bad-key", sdk=stranger)
        sent[-1].model = None  # the key is checked before the body is read

        response = httpx.post(gw.url + "/v1/chat/completions", content=b'{"model": "gpt", "messages": [',
                              headers={"authorization": f"Bearer {KEY}", "content-type": "application/json",
                                       "x-keel-feature": "bad-json"}, timeout=10)
        assert response.status_code == 400
        assert_openai_error(response.json(), "invalid_json")
        sent.append(Sent("bad_json", response.headers[REQUEST_ID], 400, None, False, "bad-json"))

        raw = chat.with_raw_response.create(
            model="slow", messages=[{"role": "user", "content": f"closed early {i}"}], stream=True,
            extra_headers={"x-keel-feature": "closing"},
        )
        stream = raw.parse()
        chunks = iter(stream)
        next(chunks), next(chunks)  # the role chunk and one piece of a 600-piece, 60-second answer
        stream.close()
        sent.append(Sent("closed", raw.headers[REQUEST_ID], 499, "slow", True, "closing"))

    # Tags taken from the body when an unknown model refuses the call.
    refused("unknown_model_tags", "no-such-model", 404, "model_not_found", None, "user-unknown",
            metadata={"feature": "from-metadata-unknown"})
    plain("long_header", [{"role": "user", "content": "long header"}], "F" * LONG, "U" * LONG)
    # As much as OpenAI's limits let through (16 pairs, keys of 64, values of 512 characters): more
    # than the log keeps of it. Over those limits is a 400 (tests/e2e/test_bad_input.py).
    metadata = {"feature": "M" * 512, **{f"k{i:02d}" + "x" * 61: "v" * 512 for i in range(15)}}
    plain("long_metadata", [{"role": "user", "content": "long metadata"}], None, None, metadata=metadata)
    plain("cost_plain", COST_MESSAGES)
    streamed("cost_stream", "gpt", COST_MESSAGES)
    streamed("no_usage", "replayed", [{"role": "user", "content": "replay"}])
    for i in range(2):
        raw = chat.with_raw_response.create(model="mystery", messages=[{"role": "user", "content": f"unpriced {i}"}])
        sent.append(Sent("unpriced", raw.headers[REQUEST_ID], 200, "mystery"))
    client.close()
    stranger.close()
    # A closed stream is recorded when the gateway notices the disconnect, maybe after the calls
    # that followed: SIGTERM only once all of them are queued for the log (counted with the record).
    wait_until_counted([gw], N, outcome="client_closed", key=KEY)
    return sent


# ---------------------------------------------------------------------------- completeness


def test_every_call_leaves_exactly_one_record_under_its_response_request_id(run: LogRun) -> None:
    logged = Counter(row["request_id"] for row in run.rows)
    assert all(count == 1 for count in logged.values()), logged.most_common(3)
    missing = sorted(s.kind for s in run.sent if s.request_id not in logged)
    assert not missing, f"no record for: {missing}"
    assert set(logged) == {s.request_id for s in run.sent}
    assert len(run.rows) == len(run.sent) == 8 * N + 8


def test_each_outcome_is_logged_as_many_times_as_it_happened(run: LogRun) -> None:
    expected = Counter(OUTCOME[s.kind][0] for s in run.sent)
    assert Counter(row["outcome"] for row in run.rows) == expected
    assert expected["client_closed"] == expected["error"] == expected["budget_exceeded"] == N


def test_each_record_has_the_status_and_error_type_the_client_saw(run: LogRun) -> None:
    for s in run.sent:
        row = run.records[s.request_id]
        outcome, status, error_type = OUTCOME[s.kind]
        assert (row["outcome"], row["status"], row["error_type"]) == (outcome, status, error_type), s.kind
        assert row["status"] == s.status
        assert (row["error_message"] is None) == (error_type is None), s.kind
        assert row["model"] == s.model
        assert row["stream"] is s.stream, s.kind
        assert row["endpoint"] == "chat"


# ---------------------------------------------------------------------------- fields of answered calls


def test_answered_calls_record_the_upstream_model_fingerprint_and_its_usage(run: LogRun) -> None:
    for s, row in run.of(*ANSWERED):
        assert row["upstream_model"] == UPSTREAM_MODEL, s.kind
        assert row["system_fingerprint"] == "fp_fake", s.kind
        assert row["deployment"] == "gpt-main"
        assert (row["attempts"], row["fallbacks"], row["cache_status"]) == (1, 0, "none")
        assert row["prompt_tokens"] == fake_prompt_tokens(s.messages) > 0, s.kind
        assert row["completion_tokens"] > 0
        if s.usage is not None:  # what the client was told is what was logged
            assert (row["prompt_tokens"], row["completion_tokens"]) == (
                s.usage["prompt_tokens"], s.usage["completion_tokens"]
            )
        assert row["cost_estimated"] is False, s.kind


def test_answered_calls_cost_what_the_configured_prices_say(run: LogRun) -> None:
    for s, row in run.of(*ANSWERED):
        nanos = expected_nanos("gpt-4o-mini", row["prompt_tokens"], row["completion_tokens"])
        assert row["cost_nanousd"] == nanos > 0, s.kind
        assert row["cost_usd"] == pytest.approx(nanos / 1e9, rel=1e-12)


def test_latency_is_logged_for_every_call_and_time_to_first_token_for_streams(run: LogRun) -> None:
    for s in run.sent:
        row = run.records[s.request_id]
        assert row["latency_ms"] > 0, s.kind
        assert row["started_at"] <= row["ended_at"]
        assert row["ended_at"] - row["started_at"] == pytest.approx(row["latency_ms"] / 1000, abs=0.01)
    for s, row in run.of("stream", "cost_stream", "no_usage", "closed"):
        assert row["ttft_ms"] is not None and 0 < row["ttft_ms"] <= row["latency_ms"], s.kind
        assert row["upstream_ms"] is not None and row["upstream_ms"] > 0
    for s, row in run.of("plain", "cost_plain", "failed", "budget", "bad_json", "unknown_model"):
        assert row["ttft_ms"] is None, s.kind


def test_the_answer_and_question_are_logged_only_when_log_content_is_on(run: LogRun) -> None:
    if not run.log_content:
        assert all(row["input"] is None and row["output"] is None for row in run.rows)
        return
    for s, row in run.of("plain", "stream", "cost_plain", "cost_stream"):
        assert row["input"] == s.messages, s.kind
        assert row["output"]["role"] == "assistant" and row["output"]["content"] == s.answer, s.kind
        assert s.answer == "echo: " + s.messages[-1]["content"]
    for s, row in run.of("failed", "budget"):
        assert row["input"] == s.messages and row["output"] is None, s.kind


# ---------------------------------------------------------------------------- failed and refused calls


def test_an_upstream_500_is_logged_as_an_error_that_cost_nothing(run: LogRun) -> None:
    for _, row in run.of("failed"):
        assert (row["attempts"], row["deployment"]) == (1, "broken-main")
        assert row["attempt_log"][0]["deployment"] == "broken-main"
        assert row["attempt_log"][0]["error"] == "upstream_server_error"
        assert (row["cost_nanousd"], row["prompt_tokens"], row["completion_tokens"]) == (0, 0, 0)
        assert row["upstream_model"] is None and row["output"] is None


def test_refusals_before_any_upstream_cost_nothing_and_made_no_attempt(run: LogRun) -> None:
    for s, row in run.of("budget", "bad_json", "unknown_model", "unknown_model_tags", "bad_key"):
        assert (row["attempts"], row["cost_nanousd"], row["cost_usd"]) == (0, 0, 0.0), s.kind
        assert row["upstream_model"] is None and row["deployment"] is None, s.kind


def test_a_stream_the_client_closes_early_is_logged_as_client_closed(run: LogRun) -> None:
    for _, row in run.of("closed"):
        assert row["deployment"] == "slow-main" and row["attempts"] == 1
        # Two of 600 pieces were read, and it was charged for what was sent: the upstream was let go
        # within seconds of the client, not read on to its end a minute later.
        assert 0 < row["completion_tokens"] < 50
        assert row["latency_ms"] < 30_000


# ---------------------------------------------------------------------------- tags


def test_feature_comes_from_the_header_or_metadata_and_user_from_the_request(run: LogRun) -> None:
    for s, row in run.of("plain", "stream", "failed", "budget", "bad_json", "unknown_model", "closed", "bad_key"):
        assert row["feature"] == s.feature, s.kind
        assert row["user"] == s.user, s.kind
    for _, row in run.of("stream"):
        assert row["metadata"] == {"feature": "from-metadata"}


def test_a_refused_unknown_model_call_keeps_its_user_and_metadata_feature(run: LogRun) -> None:
    ((s, row),) = run.of("unknown_model_tags")
    assert (row["user"], row["feature"]) == (s.user, s.feature)


def test_every_record_carries_the_key_id_and_never_the_key(run: LogRun) -> None:
    for s in run.sent:
        expected = key_id_of(WRONG_KEY if s.kind == "bad_key" else KEY)
        assert run.records[s.request_id]["key_id"] == expected, s.kind
    assert not any(KEY in repr(row) or WRONG_KEY in repr(row) for row in run.rows)


def test_an_overlong_feature_user_and_metadata_are_cut_not_stored_whole(run: LogRun) -> None:
    ((_, header),) = run.of("long_header")
    assert header["feature"] == "F" * MAX_TAG_CHARS
    assert header["user"] == "U" * MAX_TAG_CHARS
    ((_, body),) = run.of("long_metadata")
    assert body["feature"] == "M" * MAX_TAG_CHARS
    metadata = body["metadata"]
    assert sum(len(k) + len(str(v)) for k, v in metadata.items()) <= MAX_METADATA_CHARS
    assert all(len(k) <= MAX_TAG_CHARS for k in metadata)
    assert metadata["feature"].startswith("M") and len(repr(metadata)) < 15 * 512


# ---------------------------------------------------------------------------- cost


def test_a_streamed_call_costs_exactly_what_the_same_plain_call_costs(run: LogRun) -> None:
    ((_, plain),) = run.of("cost_plain")
    ((_, streamed),) = run.of("cost_stream")
    usage = (plain["prompt_tokens"], plain["completion_tokens"])
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == usage == (
        fake_prompt_tokens(COST_MESSAGES), COST_CHUNKS,
    )
    assert streamed["cost_nanousd"] == plain["cost_nanousd"] == expected_nanos("gpt-4o-mini", *usage) > 0
    assert streamed["cost_usd"] == plain["cost_usd"]
    assert not streamed["cost_estimated"] and not plain["cost_estimated"]


def test_a_stream_whose_upstream_sent_no_usage_is_charged_an_estimate_marked_as_one(run: LogRun) -> None:
    ((s, row),) = run.of("no_usage")
    assert s.answer and s.usage is None
    assert row["upstream_model"] == "gpt-4o-2024-08-06" and row["deployment"] == "replay-main"
    assert row["cost_estimated"] is True
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["cost_nanousd"] == expected_nanos("gpt-4o", row["prompt_tokens"], row["completion_tokens"]) > 0



def test_a_call_to_a_model_with_no_known_price_is_marked_unpriced_not_free(run: LogRun) -> None:
    for _, record in run.of("unpriced"):
        assert (record["cost_unpriced"], record["cost_nanousd"], record["deployment"]) == (True, 0, "mystery-main")
    assert not any(record["cost_unpriced"] for sent, record in run.of(*ANSWERED, "no_usage"))


def test_the_report_counts_the_unpriced_calls_and_says_their_cost_is_unknown(run: LogRun) -> None:
    def report(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "keel.cli", "report", "--config", str(run.config_path),
                               "--since", "1h", *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "NO_COLOR": "1"}, cwd=run.config_path.parent)
        assert done.returncode in (0, 1), done.stderr  # 1: some SLO row failed, which is not the point here
        return done.stdout

    found = json.loads(report("--format", "json"))
    assert found["unpriced_calls"] == 2
    assert found["unpriced_by_deployment"] == [{"deployment": "mystery-main", "calls": 2}]
    markdown = report("--format", "markdown")
    assert "2 calls answered by a deployment with no known price (mystery-main 2)" in markdown
    assert "their cost is unknown, not $0" in markdown
