"""The caller's schemas checked before any model is asked to follow them (keel.validation.schema)."""

from __future__ import annotations

from typing import Any

import pytest

from keel.errors import InvalidRequest
from keel.types import ChatRequest
from keel.validation.answer import expectations
from keel.validation.schema import MAX_SCHEMA_BYTES, SchemaCache

PARAM = "response_format.json_schema.schema"


def refused(schema: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        SchemaCache().validator(schema, PARAM)
    assert caught.value.status == 400
    assert caught.value.param == PARAM
    return caught.value


def test_a_schema_that_breaks_the_metaschema_is_refused_naming_where() -> None:
    error = refused({"type": "object", "properties": {"price": {"type": "nmber"}}})
    assert "$.properties.price.type" in error.message
    assert "'nmber'" in error.message


def test_a_schema_over_the_size_limit_is_refused_with_its_size() -> None:
    big = {"type": "object", "description": "x" * (MAX_SCHEMA_BYTES + 1)}
    error = refused(big)
    assert f"at most {MAX_SCHEMA_BYTES // 1024} KB" in error.message


@pytest.mark.parametrize("schema", [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},
])
def test_a_loop_of_references_that_describes_no_value_is_refused(schema: dict[str, Any]) -> None:
    assert "refers back to itself" in refused(schema).message


def test_a_recursive_schema_through_properties_is_accepted_and_validates() -> None:
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "number"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}
    validator = SchemaCache().validator(tree, PARAM)
    deep = {"value": 1, "children": [{"value": 2, "children": [{"value": "three"}]}]}
    errors = list(validator.iter_errors(deep))
    assert [list(e.absolute_path) for e in errors] == [["children", 0, "children", 0, "value"]]


@pytest.mark.parametrize("ref", ["#/$defs/missing", "https://example.invalid/schema.json"])
def test_a_reference_to_nothing_inside_is_refused_and_nothing_is_fetched(ref: str) -> None:
    error = refused({"type": "object", "properties": {"a": {"$ref": ref}}})
    assert repr(ref) in error.message and "nothing is fetched" in error.message


def test_the_draft_named_by_schema_is_used() -> None:
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "number", "maximum": 5,
              "exclusiveMaximum": True}
    validator = SchemaCache().validator(draft4, PARAM)
    assert not validator.is_valid(5) and validator.is_valid(4)


def test_formats_are_not_checked() -> None:
    validator = SchemaCache().validator({"type": "string", "format": "email"}, PARAM)
    assert validator.is_valid("not an email")


def test_compiled_validators_are_reused_by_content_and_the_cache_is_bounded() -> None:
    cache = SchemaCache(size=2)
    first = cache.validator({"type": "object", "required": ["a"]}, PARAM)
    assert cache.validator({"required": ["a"], "type": "object"}, PARAM) is first  # same schema, keys reordered
    cache.validator({"type": "string"}, PARAM)
    cache.validator({"type": "number"}, PARAM)
    assert len(cache) == 2
    assert cache.validator({"type": "object", "required": ["a"]}, PARAM) is not first  # evicted, compiled again


def request(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_a_tool_without_parameters_takes_an_object_of_no_arguments() -> None:
    expect = expectations(request(tools=[{"type": "function", "function": {"name": "now"}}]), SchemaCache())
    assert expect.tools["now"].is_valid({}) and not expect.tools["now"].is_valid([])


def test_a_tool_with_invalid_parameters_is_refused_naming_the_tool() -> None:
    bad = request(tools=[
        {"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "bad", "parameters": {"type": "object", "required": "city"}}},
    ])
    with pytest.raises(InvalidRequest) as caught:
        expectations(bad, SchemaCache())
    assert caught.value.param == "tools[1].function.parameters"
    assert "$.required" in caught.value.message


def test_json_schema_without_a_schema_is_refused() -> None:
    bare = request(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(InvalidRequest) as caught:
        expectations(bare, SchemaCache())
    assert caught.value.param == PARAM
