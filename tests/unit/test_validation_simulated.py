"""The simulated provider's broken JSON on purpose (`invalid_json_rate`), which the validation stage catches."""

from __future__ import annotations

from typing import Any

from keel.config import ModelConfig, SimulatedDeployment
from keel.pipeline import Call, Completion
from keel.providers.simulated import SimulatedProvider
from keel.types import ChatRequest
from keel.validation.answer import expectations, problems
from keel.validation.schema import SchemaCache

SCHEMA = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]


def provider(rate: float, seed: int = 7) -> SimulatedProvider:
    return SimulatedProvider(SimulatedDeployment(provider="simulated", invalid_json_rate=rate, seed=seed), "sim")


def request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "sim", "messages": [{"role": "user", "content": "hi"}], **fields})


JSON_SCHEMA = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}


async def answer(sim: SimulatedProvider, req: ChatRequest) -> dict[str, Any]:
    model = ModelConfig.model_validate({"name": "sim", "deployments": [{"provider": "simulated"}]})
    reply = await sim.chat(req, Call(request=req, model=model, deployments=[]))
    assert isinstance(reply, Completion)
    return reply.body


async def invalid_share(sim: SimulatedProvider, req: ChatRequest, calls: int) -> float:
    expect = expectations(req, SchemaCache())
    bad = [bool(problems(expect, await answer(sim, req))) for _ in range(calls)]
    return sum(bad) / calls


async def test_at_rate_one_every_json_answer_is_invalid_and_at_zero_none_is() -> None:
    json_object = {"response_format": {"type": "json_object"}}
    for fields in (JSON_SCHEMA, json_object, {"tools": TOOLS, "tool_choice": "required"}):
        assert await invalid_share(provider(1.0), request(**fields), 20) == 1.0
        assert await invalid_share(provider(0.0), request(**fields), 20) == 0.0


async def test_the_share_broken_follows_the_rate_and_both_kinds_occur() -> None:
    sim = provider(0.3, seed=11)
    req = request(**JSON_SCHEMA)
    expect = expectations(req, SchemaCache())
    found = [problems(expect, await answer(sim, req)) for _ in range(400)]
    broken = [f for f in found if f]
    assert 0.2 < len(broken) / 400 < 0.4
    assert any("not valid JSON" in f[0] for f in broken)
    assert any("is not of type" in f[0] for f in broken)


async def test_the_same_seed_breaks_the_same_calls_and_text_answers_are_never_broken() -> None:
    req = request(**JSON_SCHEMA)
    first = [await answer(provider(0.5, seed=3), req) for _ in range(1)]
    runs = []
    for _ in range(2):
        sim = provider(0.5, seed=3)
        runs.append([(await answer(sim, req))["choices"][0]["message"]["content"] for _ in range(30)])
    assert runs[0] == runs[1] and first
    text = provider(1.0)
    assert (await answer(text, request()))["choices"][0]["message"]["content"] == "echo: hi"
