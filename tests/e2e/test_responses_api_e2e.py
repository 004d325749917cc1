"""The Responses API through a real `keel serve`, with the official openai SDK unchanged but for the base
URL: plain, streamed (`stream=True` and `responses.stream`), a function tool round trip, a conversation
continued with `previous_response_id`, stored responses read and deleted, `text.format` json_schema;
against the simulated provider, an OpenAI-compatible fake upstream and (briefly) the embedded model.
Then stored responses kept apart by tenant, and refusals and a failed stream as the SDK reports them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import GatewayProcess
from observability_helpers import openai_deployment, store_section
from spec import validate
from test_keys_e2e import create_key

from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

TOOL: Any = {"type": "function", "name": "get_weather", "description": "The weather in a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                            "additionalProperties": False}, "strict": True}
MODELS = ["sim", "gpt"]  # every feature; the embedded model (`local`) answers the plain ones, kept short


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    tmp = tmp_path_factory.mktemp("responses")
    with FakeOpenAIServer(FakeBehaviour(chunks=4)) as upstream:
        gw = GatewayProcess({"models": [
            {"name": "sim", "deployments": [{"provider": "simulated"}]},
            {"name": "cut", "deployments": [{"provider": "simulated", "errors": {"cut": 1.0}}]},
            {"name": "count", "deployments": [{"provider": "simulated", "template": "sent {message_count}"}]},
            {"name": "gpt", "deployments": [openai_deployment("gpt-main", upstream.url)]},
            {"name": "local", "deployments": [{"provider": "local", "default_max_tokens": 8}]},
        ], "store": store_section(f"sqlite:///{tmp}/log.db", tmp)}, tmp).start()
        try:
            yield openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        finally:
            gw.stop()


def as_dict(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(response.model_dump_json(exclude_unset=True))
    return body


@pytest.mark.parametrize("model", [*MODELS, "local"])
def test_a_plain_call_is_a_response_the_spec_accepts(client: openai.OpenAI, model: str) -> None:
    response = client.responses.create(model=model, input="Say hello.", instructions="Be brief.",
                                       max_output_tokens=8, metadata={"feature": "e2e"})
    validate("Response", as_dict(response))
    assert response.id.startswith("resp_") and response.status in ("completed", "incomplete")
    assert response.output_text and response.output[0].type == "message"
    assert response.usage is not None and response.usage.output_tokens > 0
    assert response.instructions == "Be brief." and response.metadata == {"feature": "e2e"}


@pytest.mark.parametrize("model", [*MODELS, "local"])
def test_a_streamed_call_is_the_responses_event_stream(client: openai.OpenAI, model: str) -> None:
    events = list(client.responses.create(model=model, input="Count to three.", max_output_tokens=8, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas and final.output_text == deltas
    assert final.usage is not None and final.usage.total_tokens > 0  # the stream asked for usage
    validate("Response", as_dict(final))


@pytest.mark.parametrize("model", MODELS)
def test_the_sdks_stream_helper_gives_the_final_response(client: openai.OpenAI, model: str) -> None:
    with client.responses.stream(model=model, input="Tell me something.") as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(texts) != ""
    assert client.responses.retrieve(final.id).output_text == final.output_text  # streamed answers are stored


@pytest.mark.parametrize("model", MODELS)
def test_a_function_tool_round_trip(client: openai.OpenAI, model: str) -> None:
    asked = client.responses.create(model=model, input="What is the weather in Oslo?", tools=[TOOL],
                                    tool_choice="required")
    [call] = asked.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert "city" in json.loads(call.arguments)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    # Continued from the stored response...
    answered = client.responses.create(model=model, previous_response_id=asked.id, input=[result], tools=[TOOL])
    assert answered.output_text and answered.previous_response_id == asked.id
    # ...or with the whole conversation sent again, as a client that stores nothing does.
    again = client.responses.create(model=model, store=False, tools=[TOOL], input=[
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        result])
    assert again.output_text


@pytest.mark.parametrize("model", MODELS)
def test_a_streamed_tool_call_arrives_as_function_call_events(client: openai.OpenAI, model: str) -> None:
    events = list(client.responses.create(model=model, input="Weather in Oslo?", tools=[TOOL],
                                          tool_choice={"type": "function", "name": "get_weather"}, stream=True))
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.name == "get_weather" and "city" in json.loads(done.arguments)


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    # This simulated model answers with the number of messages it was sent.
    first = client.responses.create(model="count", input="My name is Ada.", instructions="Old rules.")
    assert first.output_text == "sent 2"  # the instructions and the input
    second = client.responses.create(model="count", input="What is my name?", previous_response_id=first.id)
    assert second.output_text == "sent 3"  # the first turn's question and answer, not its instructions; this one
    third = client.responses.create(model="count", input="And?", instructions="New rules.",
                                    previous_response_id=second.id)
    assert third.output_text == "sent 6"
    counted = client.responses.create(model="gpt", input="And now?", previous_response_id=second.id)
    assert counted.output_text and counted.previous_response_id == second.id


def test_previous_response_id_with_the_embedded_model(client: openai.OpenAI) -> None:
    first = client.responses.create(model="local", input="Say hi.", max_output_tokens=4)
    second = client.responses.create(model="local", input="Again.", previous_response_id=first.id,
                                     max_output_tokens=4)
    assert second.output_text and second.previous_response_id == first.id


def test_a_stored_response_is_read_and_deleted(client: openai.OpenAI) -> None:
    made = client.responses.create(model="gpt", input="Remember this.")
    read = client.responses.retrieve(made.id)
    assert as_dict(read) == as_dict(made)
    validate("Response", as_dict(read))
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(made.id)
    assert gone.value.body["code"] == "not_found" and made.id in gone.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt", input="More.", previous_response_id=made.id)


def test_a_response_made_with_store_false_cannot_be_read(client: openai.OpenAI) -> None:
    made = client.responses.create(model="sim", input="Forget this.", store=False)
    assert made.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


@pytest.mark.parametrize("model", MODELS)
def test_text_format_json_schema_gives_json_of_that_schema(client: openai.OpenAI, model: str) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}
    response = client.responses.create(model=model, input="Plan a trip.", text={"format": {
        "type": "json_schema", "name": "trip", "schema": schema, "strict": True}})
    answer = json.loads(response.output_text)
    assert set(answer) == {"city", "days"} and isinstance(answer["days"], int)
    assert response.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_an_unsupported_field_is_a_400_the_sdk_reports(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="sim", input="Search the web.", tools=[{"type": "web_search"}])
    body: Any = refused.value.body
    assert body["param"] == "tools[0].type" and "function tools only" in body["message"]
    with pytest.raises(openai.BadRequestError) as background:
        client.responses.create(model="sim", input="Later.", background=True)
    assert background.value.body["param"] == "background"  # type: ignore[index]


def test_a_stream_that_fails_midway_ends_with_error_and_response_failed(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="cut", input="A long answer, please.", stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-2:] == ["error", "response.failed"]
    error, failed = events[-2], events[-1].response  # type: ignore[union-attr]
    assert error.code == "upstream_connection_error" and "dropped" in error.message  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and "dropped" in failed.error.message
    with client.responses.stream(model="cut", input="Again, please.") as stream:
        seen = [event.type for event in stream]
        assert seen[-1] == "response.failed"
        with pytest.raises(RuntimeError):
            stream.get_final_response()
    with pytest.raises(openai.NotFoundError):  # a failed call is not stored
        client.responses.retrieve(failed.id)


def test_stored_responses_are_kept_apart_by_tenant(gateway: Any, tmp_path: Path) -> None:
    master = "sk-master-responses-e2e"
    config = {"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
              "store": store_section(f"sqlite:///{tmp_path}/log.db", tmp_path), "auth": {"virtual_keys": True}}
    ours = create_key(config, tmp_path, "--tenant", "team-a")
    theirs = create_key(config, tmp_path, "--tenant", "team-b")
    gw: GatewayProcess = gateway(config, env={"KEEL_MASTER_KEY": master})

    def sdk(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)

    made = sdk(ours).responses.create(model="sim", input="Our secret.")
    assert sdk(ours).responses.retrieve(made.id).output_text == "echo: Our secret."
    with pytest.raises(openai.NotFoundError) as hidden:
        sdk(theirs).responses.retrieve(made.id)
    message = hidden.value.body["message"]  # type: ignore[index]
    assert "team-a" not in message and "tenant" in message  # the same answer as for an id never made
    with pytest.raises(openai.NotFoundError):
        sdk(theirs).responses.create(model="sim", input="Theirs?", previous_response_id=made.id)
    with pytest.raises(openai.NotFoundError):
        sdk(theirs).responses.delete(made.id)
    assert sdk(master).responses.retrieve(made.id).id == made.id  # the master key sees every tenant's
    with pytest.raises(openai.AuthenticationError):
        sdk("sk-keel-" + "x" * 43).responses.retrieve(made.id)
    sdk(ours).responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        sdk(master).responses.retrieve(made.id)
