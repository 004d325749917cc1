"""`chat(..., response_model=Model)`: the strict schema sent, the instance returned, the model's own
validators re-asked once then refused (422 invalid_output naming the field), what is refused up front."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field, RootModel, field_validator, model_validator

from keel.config import parse_config
from keel.engine import Keel
from keel.errors import InvalidOutput, InvalidRequest
from keel.pipeline import Call, Completion, Next, Reply
from keel.types import ChatRequest
from keel.validation import response_format_for, strict_schema

MESSAGES = [{"role": "user", "content": "Who wrote Dune?"}]


class Color(Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    city: str
    zip: str | None = None


class Person(BaseModel):
    name: str
    age: int | None = None
    home: Address = Field(description="where they live")
    past: list[Address] = []
    eyes: Color
    kind: Literal["author", "reader"]


class Node(BaseModel):
    label: str
    children: list[Node] = []


class Span(BaseModel):
    start: int
    end: int

    @model_validator(mode="after")
    def ordered(self) -> Span:
        if self.end <= self.start:
            raise ValueError("end must come after start")
        return self


class Shout(BaseModel):
    word: str

    @field_validator("word")
    @classmethod
    def loud(cls, word: str) -> str:
        if not word.isupper():
            raise ValueError("the word must be in capitals")
        return word


class Recorder:
    """A stage before reliability: keeps every request sent upstream (re-asks included), and may
    rewrite an answer's content (`rewrite(request, content) -> content`)."""

    def __init__(self, rewrite: Callable[[ChatRequest, str], str] | None = None) -> None:
        self.asked: list[ChatRequest] = []
        self.rewrite = rewrite

    async def __call__(self, call: Call, next: Next) -> Reply:
        assert isinstance(call.request, ChatRequest)
        self.asked.append(call.request)
        reply = await next(call)
        if self.rewrite is not None and isinstance(reply, Completion):
            message = reply.body["choices"][0]["message"]
            message["content"] = self.rewrite(call.request, message["content"])
        return reply


def keel_with(recorder: Recorder | None = None, *, deployment: dict[str, Any] | None = None,
              **model: Any) -> Keel:
    config = parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated", **(deployment or {})}],
                                       **model}]})
    return Keel(config, stages=[recorder] if recorder else None)


@pytest.fixture
async def made() -> Any:
    keels: list[Keel] = []
    yield keels
    for keel in keels:
        await keel.close()


def last_user_text(request: ChatRequest) -> str:
    content = request.messages[-1].content
    assert isinstance(content, str)
    return content


# ---------------------------------------------------------------------------- the schema


def test_a_small_model_becomes_this_strict_schema() -> None:
    class Pet(BaseModel):
        name: str
        age: int | None = None
        legs: int = 4

    assert strict_schema(Pet) == {
        "title": "Pet", "type": "object", "additionalProperties": False,
        "required": ["name", "age", "legs"],
        "properties": {
            "name": {"title": "Name", "type": "string"},
            "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Age"},
            "legs": {"title": "Legs", "type": "integer"},
        },
    }
    assert response_format_for(Pet) == {
        "type": "json_schema", "json_schema": {"name": "Pet", "schema": strict_schema(Pet), "strict": True}}


def test_nested_models_keep_their_refs_and_a_described_one_is_inlined_strict() -> None:
    schema = strict_schema(Person)
    address = {"title": "Address", "type": "object", "additionalProperties": False, "required": ["city", "zip"],
               "properties": {"city": {"title": "City", "type": "string"},
                              "zip": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Zip"}}}
    assert schema["$defs"]["Address"] == address
    assert schema["properties"]["home"] == {**address, "description": "where they live"}
    assert schema["properties"]["past"] == {"items": {"$ref": "#/$defs/Address"}, "title": "Past", "type": "array"}
    assert schema["properties"]["eyes"] == {"$ref": "#/$defs/Color"}
    assert schema["$defs"]["Color"]["enum"] == ["red", "blue"]
    assert schema["properties"]["kind"]["enum"] == ["author", "reader"]
    assert schema["required"] == ["name", "age", "home", "past", "eyes", "kind"]


def test_a_recursive_model_is_an_object_at_the_root_and_recursive_through_defs() -> None:
    schema = strict_schema(Node)
    assert schema["type"] == "object" and "$ref" not in schema
    assert schema["required"] == ["label", "children"] and schema["additionalProperties"] is False
    assert schema["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    assert schema["$defs"]["Node"]["additionalProperties"] is False


def test_a_discriminated_union_becomes_any_of_without_pydantic_keywords() -> None:
    class Cat(BaseModel):
        kind: Literal["cat"]

    class Dog(BaseModel):
        kind: Literal["dog"]

    class Owner(BaseModel):
        pet: Cat | Dog = Field(discriminator="kind")

    pet = strict_schema(Owner)["properties"]["pet"]
    assert "oneOf" not in pet and "discriminator" not in pet
    assert pet["anyOf"] == [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]


def test_free_form_keys_and_non_object_models_are_refused_naming_the_field() -> None:
    class Scores(BaseModel):
        by_name: dict[str, int]

    with pytest.raises(InvalidRequest, match=r"Scores\.by_name .*list of key/value models"):
        strict_schema(Scores)

    class Names(RootModel[list[str]]):
        pass

    with pytest.raises(InvalidRequest, match="does not describe a JSON object"):
        strict_schema(Names)


def test_the_caller_cannot_change_the_shared_schema() -> None:
    strict_schema(Person)["properties"].clear()
    response_format_for(Person)["json_schema"]["schema"]["required"].clear()
    assert strict_schema(Person)["required"] == ["name", "age", "home", "past", "eyes", "kind"]


# ---------------------------------------------------------------------------- through the pipeline


async def test_round_trip_with_the_simulated_provider_gives_a_validated_instance(made: list[Keel]) -> None:
    recorder = Recorder()
    made.append(keel := keel_with(recorder))
    person = await keel.chat(model="m", messages=MESSAGES, response_model=Person)
    assert isinstance(person, Person)
    assert isinstance(person.home, Address) and isinstance(person.eyes, Color)
    assert person.kind in ("author", "reader")
    [sent] = recorder.asked
    assert sent.response_format is not None and sent.response_format.type == "json_schema"
    spec = sent.response_format.json_schema
    assert spec.name == "Person" and spec.strict is True and spec.schema_ == strict_schema(Person)


async def test_a_recursive_model_round_trips(made: list[Keel]) -> None:
    made.append(keel := keel_with())
    node = await keel.chat(model="m", messages=MESSAGES, response_model=Node)
    assert isinstance(node, Node) and node.children == []


async def test_broken_json_is_repaired_by_the_validation_stage_and_the_instance_is_valid(made: list[Keel]) -> None:
    recorder = Recorder()
    made.append(keel := keel_with(recorder, deployment={"invalid_json_rate": 0.4, "seed": 3},
                                  validation={"max_repairs": 6}))
    people = [await keel.chat(model="m", messages=MESSAGES, response_model=Person) for _ in range(12)]
    assert all(isinstance(p, Person) for p in people)
    repairs = [r for r in recorder.asked if "previous answer was invalid" in last_user_text(r)]
    assert repairs, "the broken answers were re-asked"
    assert len(recorder.asked) == 12 + len(repairs)


async def test_a_model_validator_that_fails_is_re_asked_once_then_refused_naming_the_reason(
    made: list[Keel],
) -> None:
    recorder = Recorder()  # the simulated minimal instance has start == end == 0: never ordered
    made.append(keel := keel_with(recorder))
    with pytest.raises(InvalidOutput) as raised:
        await keel.chat(model="m", messages=MESSAGES, response_model=Span)
    assert raised.value.status == 422 and raised.value.code == "invalid_output"
    assert raised.value.param == "response_model"
    assert "Span" in raised.value.message and "$: Value error, end must come after start" in raised.value.message
    first, repair = recorder.asked
    assert "end must come after start" in last_user_text(repair)
    assert repair.messages[-2].content == '{"start": 0, "end": 0}'  # the invalid answer went back
    assert len(repair.messages) == len(first.messages) + 2


async def test_a_field_validator_error_names_the_field_and_a_fixed_repair_answer_is_returned(
    made: list[Keel],
) -> None:
    def fix_on_repair(request: ChatRequest, content: str) -> str:
        return '{"word": "HELLO"}' if "previous answer was invalid" in last_user_text(request) else content

    recorder = Recorder(fix_on_repair)
    made.append(keel := keel_with(recorder))
    shout = await keel.chat(model="m", messages=MESSAGES, response_model=Shout)
    assert shout == Shout(word="HELLO")
    assert "$.word: Value error, the word must be in capitals" in last_user_text(recorder.asked[1])


async def test_a_refusal_is_an_invalid_output_that_quotes_it(made: list[Keel]) -> None:
    class Refusing(Recorder):
        async def __call__(self, call: Call, next: Next) -> Reply:
            reply = await next(call)
            assert isinstance(reply, Completion)
            reply.body["choices"][0]["message"].update(content=None, refusal="I cannot help with that.")
            return reply

    made.append(keel := keel_with(Refusing()))
    with pytest.raises(InvalidOutput, match="refused to answer, so no Person could be built: I cannot help"):
        await keel.chat(model="m", messages=MESSAGES, response_model=Person)


def test_chat_sync_returns_the_instance_and_refuses_a_stream() -> None:
    keel = keel_with()
    try:
        person = keel.chat_sync(model="m", messages=MESSAGES, response_model=Person)
        assert isinstance(person, Person) and isinstance(person.home, Address)
        with pytest.raises(InvalidRequest, match="cannot be streamed") as raised:
            keel.chat_sync(model="m", messages=MESSAGES, response_model=Person, stream=True)  # type: ignore[call-overload]
        assert raised.value.param == "stream"
    finally:
        keel.close_sync()


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"stream": True}, "stream", "cannot be streamed"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "cannot be combined"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not both"),
])
async def test_what_cannot_give_an_instance_is_refused_before_any_call(
    made: list[Keel], extra: dict[str, Any], param: str, words: str,
) -> None:
    recorder = Recorder()
    made.append(keel := keel_with(recorder))
    with pytest.raises(InvalidRequest, match=words) as raised:
        await keel.chat(model="m", messages=MESSAGES, response_model=Person, **extra)
    assert raised.value.param == param and raised.value.status == 400
    assert recorder.asked == []


async def test_a_class_that_is_not_a_pydantic_model_is_refused(made: list[Keel]) -> None:
    made.append(keel := keel_with())
    with pytest.raises(InvalidRequest, match="must be a pydantic model class"):
        await keel.chat(model="m", messages=MESSAGES, response_model=dict)  # type: ignore[call-overload]
