"""`response_model`: a pydantic model class as the shape of the answer, for the library's `chat`.

    person = await keel.chat(model="fast", messages=[...], response_model=Person)   # a Person

The model becomes the request's `response_format` (`json_schema`, `strict: true`) with the schema
`strict_schema` derives from `model_json_schema()`, so every provider is asked for exactly that shape
and the validation stage checks (and re-asks for) the JSON as it does for any caller. The answer is
then parsed with `model_validate_json`. What JSON Schema cannot say (a validator of the model's own,
such as "end after start") is only seen there: its pydantic errors go back to the model once, through
the same re-ask (`repair.repair_request`: the invalid answer and the errors, path by path), as a second
call of the pipeline (its own log record and cost); if that answer fails too, `InvalidOutput` (422)
names the failing path. One round, not `max_repairs`: the schema rounds already ran, and a model that
breaks a rule it was just told about twice is rarely fixed by a third try.

Refused up front (`InvalidRequest`), since no instance could honestly be returned:
- `stream=True`: an instance needs the whole answer; partial models would be instances that fail
  their own validation. Stream with `response_format=response_format_for(Model)` and parse at the end.
- `tools`: the model may answer with tool calls instead of content. Parse tool calls yourself.
- `response_format` as well: the model *is* the response format.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable, Mapping
from functools import lru_cache
from typing import Any, TypeVar

from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError

from keel.errors import InvalidOutput, InvalidRequest
from keel.request_errors import parse_request
from keel.types import ChatRequest
from keel.validation.answer import MAX_PROBLEMS, Expectations
from keel.validation.repair import repair_request
from keel.validation.schema import json_path

M = TypeVar("M", bound=BaseModel)
Ask = Callable[[ChatRequest], Awaitable[Mapping[str, Any]]]  # a request through the pipeline -> its body

_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")  # OpenAI's json_schema.name: [a-zA-Z0-9_-], at most 64
_DROPPED = ("default", "discriminator")  # see strict_schema


def strict_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model.model_json_schema()` made acceptable to OpenAI's strict structured outputs.

    Transformed, on every schema node (the root, `$defs`, properties, items, anyOf branches):
    - every object gets `additionalProperties: false` and lists *all* its properties in `required`.
      A field with a default is therefore always sent by the model (its default is never used), and
      an `Optional[X] = None` field is required with type `X | null` (pydantic already writes the
      null branch): the model writes `null` where it has nothing.
    - `default` is dropped (with every property required it never applies) and so is pydantic's
      `discriminator` (not JSON Schema); `oneOf` (pydantic's discriminated unions) becomes `anyOf`,
      the same thing when the branches' tags differ, and the union strict mode supports.
    - a `$ref` with keywords beside it (pydantic writes `{"$ref": ..., "description": ...}` for a
      described nested model) is replaced by the definition it points at, merged with those keywords,
      since strict mode takes a `$ref` alone; other `$ref`s and `$defs` are kept (a recursive model
      stays recursive); a single-branch `allOf` is merged into its parent.
    Kept as they are: `title`, `description`, `enum`, `const`, and value constraints (`minimum`,
    `pattern`, `maxItems`...), which the validation stage and pydantic check anyway.

    Not expressible, refused with an `InvalidRequest` naming the field: objects with free-form keys
    (`dict[str, X]` fields, `extra="allow"` models), since strict mode needs every key named (use a
    list of key/value models); and a model whose schema is not an object (a `RootModel` of a list:
    wrap it in a model with one field).
    """
    return copy.deepcopy(_strict_schema(model))


def response_format_for(model: type[BaseModel]) -> dict[str, Any]:
    """The `response_format` asking for an instance of `model`: also what to send when streaming."""
    return copy.deepcopy(_response_format(model))


def chat_request(model: type[BaseModel], params: dict[str, Any], *, stream: bool | None) -> ChatRequest:
    """The request of `chat(..., response_model=model)`, or an InvalidRequest when it cannot be one."""
    check_response_model(model, params, stream=stream)
    return parse_request(ChatRequest, {**params, "response_format": _response_format(model)}, strict=False)


def check_response_model(model: Any, params: Mapping[str, Any], *, stream: bool | None) -> None:
    """An InvalidRequest when `chat(..., response_model=model, **params)` cannot give an instance."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise InvalidRequest(f"response_model must be a pydantic model class (a subclass of BaseModel), got "
                             f"{model!r}.", param="response_model")
    if stream:
        raise InvalidRequest(
            "response_model cannot be streamed: an instance needs the whole answer. Drop stream=True, or "
            "stream with response_format=keel.validation.response_format_for(Model) and parse the text at "
            "the end.", param="stream")
    if params.get("tools"):
        raise InvalidRequest(
            "response_model and tools cannot be combined: with tools the model may answer with tool calls "
            "instead of the model's JSON. Ask without tools, or leave out response_model and read the tool "
            "calls.", param="tools")
    if params.get("response_format") is not None:
        raise InvalidRequest(
            "Give either response_model or response_format, not both: response_model sets the response "
            "format from the model's JSON schema.", param="response_format")


async def answer_as(model: type[M], request: ChatRequest, ask: Ask) -> M:
    """The answer to `request` as an instance of `model`; its own validators' errors go back to the
    model once (the module's docstring), then an InvalidOutput naming the failing path."""
    body = await ask(request)
    parsed = _parsed(model, body)
    if not isinstance(parsed, list):
        return parsed
    expect = Expectations(json_object=True, schema=Draft202012Validator(_strict_schema(model)))
    again = await ask(repair_request(request, body["choices"][0], parsed, expect))
    found = _parsed(model, again)
    if not isinstance(found, list):
        return found
    raise InvalidOutput(
        f"The model's answer matched the JSON schema of {model.__name__} but not the model itself, after 2 "
        f"tries: {'; '.join(found)}. Such a check (a validator of the model's own) is not in the schema the "
        "model sees: describe the rule in a Field description or the prompt, or relax the validator.",
        param="response_model",
    )


def _parsed(model: type[M], body: Mapping[str, Any]) -> M | list[str]:
    """The instance in a completion body, or what is wrong with it, path by path (`$.end: ...`)."""
    message = (body.get("choices") or [{}])[0].get("message") or {}
    content = message.get("content")
    if not isinstance(content, str):
        refusal = message.get("refusal")
        if refusal:  # the model declined: no instance to build, and not something a re-ask fixes
            raise InvalidOutput(f"The model refused to answer, so no {model.__name__} could be built: {refusal}",
                                param="response_model")
        return ["$: the answer has no content; a JSON object was expected"]
    try:
        return model.model_validate_json(content)
    except ValidationError as exc:
        return [f"{json_path(error['loc'])}: {error['msg']}" for error in exc.errors(include_url=False)[:MAX_PROBLEMS]]


@lru_cache(maxsize=256)
def _response_format(model: type[BaseModel]) -> dict[str, Any]:
    """Shared by every call with `model` (never mutated: the request's copy is pydantic's own)."""
    name = _NAME_CHARS.sub("_", model.__name__)[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": _strict_schema(model), "strict": True}}


@lru_cache(maxsize=256)
def _strict_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    # A recursive model's schema is `{"$ref": "#/$defs/Node", "$defs": ...}`: its root is inlined below.
    top = _resolve(schema, schema["$ref"]) if isinstance(schema.get("$ref"), str) else schema
    if top.get("type") != "object" and "properties" not in top:
        raise InvalidRequest(
            f"response_model {model.__name__} does not describe a JSON object (its schema is {top.get('type')!r}); "
            "structured outputs answer with an object: wrap the value in a model with one field.",
            param="response_model")
    strict: dict[str, Any] = _strict(schema, schema, model.__name__, frozenset())
    return strict


def _strict(node: Any, root: Mapping[str, Any], path: str, inlining: frozenset[str]) -> Any:
    """One schema node made strict (`strict_schema`); `path` names it in errors (`Person.address`)."""
    if not isinstance(node, Mapping):
        return node  # a boolean schema
    out = {key: value for key, value in node.items() if key not in _DROPPED}
    if "oneOf" in out and "anyOf" not in out:
        out["anyOf"] = out.pop("oneOf")
    ref = out.get("$ref")
    if isinstance(ref, str) and len(out) > 1:
        if ref in inlining:  # a model nested in itself: keep the reference, drop what was beside it
            return {"$ref": ref}
        target = _resolve(root, ref)
        beside = {key: value for key, value in out.items() if key != "$ref"}
        return _strict({**target, **beside}, root, path, inlining | {ref})
    all_of = out.get("allOf")
    if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], Mapping):
        del out["allOf"]
        return _strict({**all_of[0], **out}, root, path, inlining)
    if isinstance(defs := out.get("$defs"), Mapping):
        out["$defs"] = {name: _strict(sub, root, name, inlining) for name, sub in defs.items()}
    properties = out.get("properties")
    if out.get("type") == "object" or isinstance(properties, Mapping):
        extra = out.get("additionalProperties", False)
        if extra is not False:
            raise InvalidRequest(
                f"response_model field {path} has keys the schema does not name (a dict, or extra='allow'), which "
                "strict structured outputs cannot express: every key must be a declared field. Use a list of "
                "key/value models instead.", param="response_model")
        properties = properties if isinstance(properties, Mapping) else {}
        out["properties"] = {key: _strict(sub, root, f"{path}.{key}", inlining) for key, sub in properties.items()}
        out["required"] = list(properties)
        out["additionalProperties"] = False
    for key in ("anyOf", "allOf", "prefixItems"):
        if isinstance(branches := out.get(key), list):
            out[key] = [_strict(sub, root, path, inlining) for sub in branches]
    if isinstance(items := out.get("items"), Mapping):
        out["items"] = _strict(items, root, f"{path}[]", inlining)
    return out


def _resolve(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    """A local reference (`#/$defs/Address`) in pydantic's schema."""
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node.get(part) if isinstance(node, Mapping) else None
    if not isinstance(node, Mapping):
        raise InvalidRequest(f"response_model's schema has a $ref {ref!r} that points at nothing.",
                             param="response_model")
    return node
