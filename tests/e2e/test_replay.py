"""Twelve streams recorded from the live OpenAI API, replayed by the fake upstream, reach the
`openai` SDK through the gateway unchanged: text, tool calls, refusals, logprobs, n>1
choices, finish reasons and the usage chunk, chunk by chunk.

Transcripts: tests/data/openai-sse/*.bin (openai/openai-python, Apache-2.0).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from conftest import DATA, GatewayProcess
from openai import AsyncOpenAI, OpenAI
from spec import CHAT_CHUNK, validate
from wire import AsyncRecordingTransport, RecordingTransport, check_all, stream_chunks, transcript_chunks

from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

TRANSCRIPTS = sorted((DATA / "openai-sse").glob("*.bin"))
KEY = "sk-keel-replay"


def test_all_twelve_transcripts_are_here() -> None:
    assert len(TRANSCRIPTS) == 12, f"expected 12 recorded streams in {DATA / 'openai-sse'}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FakeBehaviour()) as server:
        yield server


@pytest.fixture(scope="module")
def gw(upstream: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {"models": [
        {"name": "gpt", "deployments": [{"provider": "openai", "base_url": upstream.url, "model": "gpt-4o"}]},
    ]}
    process = GatewayProcess(config, tmp_path_factory.mktemp("replay-gw"), env={"KEEL_MASTER_KEY": KEY}).start()
    yield process
    process.stop()


def replay(upstream: FakeOpenAIServer, path: Path) -> None:
    control = upstream.url.removesuffix("/v1") + "/_fake/config"
    httpx.post(control, json={"replay": str(path), "reset_stats": True}).raise_for_status()


def request_for(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A request like the one that was recorded: logprobs asked for when they came back."""
    params: dict[str, Any] = {
        "model": "gpt", "messages": [{"role": "user", "content": "replay"}],
        "stream": True, "stream_options": {"include_usage": True},
    }
    if any(choice.get("logprobs") for chunk in chunks for choice in chunk["choices"]):
        params["logprobs"] = True
    return params


def sdk_view(chunk: Any) -> dict[str, Any]:
    """A chunk as the SDK holds it, in wire form: fields the server sent, nothing invented."""
    dumped: dict[str, Any] = chunk.model_dump(mode="json", exclude_unset=True)
    return dumped


def summary(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What a reader of the stream gets out of it, per choice."""
    out: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            slot = out.setdefault(choice["index"], {"content": "", "refusal": "", "tools": {}, "finish": None,
                                                    "logprob_tokens": []})
            delta = choice["delta"]
            slot["content"] += delta.get("content") or ""
            slot["refusal"] += delta.get("refusal") or ""
            for call in delta.get("tool_calls") or []:
                tool = slot["tools"].setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                tool["id"] = call.get("id") or tool["id"]
                function = call.get("function") or {}
                tool["name"] += function.get("name") or ""
                tool["arguments"] += function.get("arguments") or ""
            for kind in ("content", "refusal"):
                for entry in (choice.get("logprobs") or {}).get(kind) or []:
                    slot["logprob_tokens"].append((kind, entry["token"], entry["logprob"]))
            slot["finish"] = choice.get("finish_reason") or slot["finish"]
    return {"choices": out, "usage": usage}


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.name[:8] for p in TRANSCRIPTS])
def test_recorded_stream_reaches_the_sdk_unchanged(gw: GatewayProcess, upstream: FakeOpenAIServer, path: Path) -> None:
    recorded = transcript_chunks(path)
    replay(upstream, path)
    transport = RecordingTransport()
    client = OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, http_client=httpx2.Client(transport=transport))
    with client:
        received = list(client.chat.completions.create(**request_for(recorded)))

    # What the SDK yields, chunk by chunk, is what OpenAI sent.
    assert len(received) == len(recorded)
    for n, (got, sent) in enumerate(zip(received, recorded, strict=True)):
        assert sdk_view(got) == sent, f"chunk {n} of {path.name} changed on its way through the gateway"
        for choice, sent_choice in zip(got.choices, sent["choices"], strict=True):
            assert choice.index == sent_choice["index"]
            assert choice.delta.content == sent_choice["delta"].get("content")
            assert choice.delta.refusal == sent_choice["delta"].get("refusal")
            assert choice.finish_reason == sent_choice["finish_reason"]
            sent_logprobs = sent_choice.get("logprobs")
            assert (choice.logprobs.model_dump(mode="json") if choice.logprobs else None) == sent_logprobs
        assert (got.usage.model_dump(mode="json", exclude_unset=True) if got.usage else None) == sent.get("usage")

    # The same, read off the raw wire; and every chunk the gateway wrote is valid by the spec.
    wire_chunks = stream_chunks(bytes(transport.exchanges[0].body))
    assert wire_chunks == recorded
    assert summary([sdk_view(c) for c in received]) == summary(recorded)
    check_all(transport.exchanges)


@pytest.mark.parametrize("path", TRANSCRIPTS[:4], ids=[p.name[:8] for p in TRANSCRIPTS[:4]])
async def test_recorded_stream_reaches_the_async_sdk_unchanged(
    gw: GatewayProcess, upstream: FakeOpenAIServer, path: Path,
) -> None:
    recorded = transcript_chunks(path)
    replay(upstream, path)
    transport = AsyncRecordingTransport()
    client = AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=KEY, max_retries=0, http_client=httpx2.AsyncClient(transport=transport),
    )
    async with client:
        stream = await client.chat.completions.create(**request_for(recorded))
        received = [sdk_view(chunk) async for chunk in stream]
    assert received == recorded
    check_all(transport.exchanges)


def test_transcripts_cover_what_the_gateway_must_pass_through() -> None:
    """The oracle itself: the set holds every kind of stream the tests above claim to cover."""
    kinds: set[str] = set()
    for path in TRANSCRIPTS:
        chunks = transcript_chunks(path)
        for chunk in chunks:
            validate(CHAT_CHUNK, chunk)
        digest = summary(chunks)
        assert digest["usage"] is not None and chunks[-1]["choices"] == [], f"{path.name} ends with usage"
        choices = digest["choices"]
        if len(choices) > 1:
            kinds.add("n>1")
        for choice in choices.values():
            kinds.update(k for k in ("content", "refusal") if choice[k])
            if choice["tools"]:
                kinds.add("tool_calls")
            if choice["logprob_tokens"]:
                kinds.add("logprobs")
            kinds.add(f"finish:{choice['finish']}")
    assert {"n>1", "content", "refusal", "tool_calls", "logprobs", "finish:stop", "finish:tool_calls",
            "finish:length"} <= kinds
