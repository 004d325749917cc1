"""What a JSON answer must be, and what is wrong with one: the model's output checked like untrusted input.

`Expectations` are read from the request once (response_format, tools, tool_choice), their schemas
checked and compiled (`schema.py`); `problems` lists what is wrong with an answer, each naming its
JSON path (`$.items[2].price: 'abc' is not of type 'number'`), so the caller and the model re-asked
both learn where.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from jsonschema.protocols import Validator
from referencing.exceptions import Unresolvable

from keel.errors import InvalidRequest
from keel.request_errors import json_kind
from keel.types import ChatRequest, NamedToolChoice, ResponseFormatJSONObject, ResponseFormatJSONSchema
from keel.validation.schema import NO_PARAMETERS, SchemaCache, json_path

MAX_PROBLEMS = 5  # enough to fix an answer; a wholly wrong one would otherwise list every field


@dataclass(slots=True)
class Expectations:
    """What a request asks of its answer: JSON content (any object, or one matching a schema), and
    tool calls naming an offered tool with arguments matching its parameters."""

    json_object: bool = False  # response_format json_object or json_schema: content is a JSON value
    schema: Validator | None = None  # json_schema: the content matches it
    tools: dict[str, Validator] = field(default_factory=dict)  # offered tools' parameters, by name
    tool_required: str | None = None  # tool_choice "required" ("*") or a named function

    @property
    def param(self) -> str:
        """The request parameter an invalid answer failed: what the caller may change."""
        return "response_format" if self.json_object else "tools"


def needs_validation(request: ChatRequest) -> bool:
    """Whether the answer is JSON the caller relies on: other requests pass through untouched."""
    json_format = isinstance(request.response_format, ResponseFormatJSONObject | ResponseFormatJSONSchema)
    return json_format or bool(request.tools)


def expectations(request: ChatRequest, schemas: SchemaCache) -> Expectations:
    """The request's expectations, or an InvalidRequest (400) naming a bad schema."""
    expect = Expectations()
    response_format = request.response_format
    if isinstance(response_format, ResponseFormatJSONObject | ResponseFormatJSONSchema):
        expect.json_object = True
    if isinstance(response_format, ResponseFormatJSONSchema):
        param = "response_format.json_schema.schema"
        if response_format.json_schema.schema_ is None:
            raise InvalidRequest(f"Missing required parameter '{param}': json_schema needs the schema "
                                 "the answer must match (or use type 'json_object').", param=param)
        expect.schema = schemas.validator(response_format.json_schema.schema_, param)
    for i, tool in enumerate(request.tools or ()):
        parameters = tool.function.parameters
        expect.tools[tool.function.name] = schemas.validator(
            NO_PARAMETERS if parameters is None else parameters, f"tools[{i}].function.parameters"
        )
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        expect.tool_required = choice.function.name
    elif choice == "required" and request.tools:
        expect.tool_required = "*"
    return expect


def problems(expect: Expectations, body: Mapping[str, Any]) -> list[str]:
    """What is wrong with a chat.completion body under `expect`; empty when it is valid."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    if message.get("refusal") and not message.get("tool_calls"):
        return []  # the model declined: a documented answer of structured outputs, not invalid JSON
    tool_calls = message.get("tool_calls") or []
    found: list[str] = []
    if choice.get("finish_reason") == "length":
        found.append("$: the answer was cut off at the token limit (finish_reason 'length'), so its JSON is "
                     "incomplete; give a shorter answer")
    if tool_calls:
        for i, tool_call in enumerate(tool_calls):
            found.extend(_tool_call_problems(expect, i, tool_call))
    elif expect.tool_required is not None:
        wanted = "a tool" if expect.tool_required == "*" else f"the tool '{expect.tool_required}'"
        found.append(f"$: tool_choice requires a call of {wanted}, and the answer calls none")
    elif expect.json_object:
        found.extend(_value_problems(message.get("content"), expect.schema, top_object=expect.schema is None))
    return found[:MAX_PROBLEMS]


def _tool_call_problems(expect: Expectations, i: int, tool_call: Mapping[str, Any]) -> list[str]:
    function = tool_call.get("function") or {}
    name = function.get("name")
    where = f"tool_calls[{i}] ({name!r})"
    validator = expect.tools.get(name) if isinstance(name, str) else None
    if validator is None:
        offered = ", ".join(repr(n) for n in expect.tools) or "none"
        return [f"{where}: calls a tool that was not offered (offered: {offered})"]
    if expect.tool_required not in (None, "*", name):
        return [f"{where}: tool_choice requires the tool {expect.tool_required!r}"]
    return [f"{where} arguments {problem}" for problem in _value_problems(function.get("arguments"), validator,
                                                                          top_object=True)]


def _value_problems(text: Any, validator: Validator | None, *, top_object: bool) -> list[str]:
    """What is wrong with `text` as JSON (an object when `top_object`) matching `validator`."""
    if not isinstance(text, str) or not text.strip():
        return ["$: the answer is empty; a JSON value was expected"]
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return [f"$: not valid JSON ({exc.msg} at character {exc.pos})"]
    if top_object and not isinstance(value, dict):
        return [f"$: a JSON object was expected, got {json_kind(value)}"]
    if validator is None:
        return []
    try:
        errors = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
        return [f"{json_path(e.absolute_path)}: {_cut(e.message)}" for e in errors[:MAX_PROBLEMS]]
    except RecursionError:
        return ["$: the value is nested too deeply to check"]
    except Unresolvable as exc:  # a reference the up-front check could not see (under a nested $id)
        raise InvalidRequest(f"Invalid schema: a $ref cannot be resolved ({exc}).", param="response_format") from None


def _cut(text: str, limit: int = 300) -> str:
    """jsonschema's message quotes the value: a long one is cut, the message stays readable."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
