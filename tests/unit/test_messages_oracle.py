"""The oracle the Messages API tests check Keel's answers, events and errors against: the anthropic SDK's
own types (generated from Anthropic's OpenAPI description; see tests/data/anthropic/README.md), held
strictly: every field a type requires is present, with its type, and nothing it does not know is sent."""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import BaseModel, TypeAdapter

T = TypeVar("T")


def strictly(kind: Any, data: Any) -> Any:
    """`data` validated as `kind` (a model or a union), with no field the types do not know."""
    value = TypeAdapter(kind).validate_python(data, strict=True)
    unknown = list(_unknown(value, "$"))
    assert not unknown, f"fields the anthropic types do not know: {unknown}"
    return value


def _unknown(value: Any, path: str) -> Any:
    if isinstance(value, BaseModel):
        for name in value.model_extra or {}:
            yield f"{path}.{name}"
        for name in type(value).model_fields:
            yield from _unknown(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _unknown(item, f"{path}[{i}]")


def test_the_oracle_refuses_an_unknown_field() -> None:
    with pytest.raises(AssertionError, match=r"\$\.delta\.extra"):
        strictly(RawMessageStreamEvent, {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": "x", "extra": 1}})


def test_the_oracle_refuses_a_missing_field_and_a_wrong_type() -> None:
    with pytest.raises(ValueError, match="usage"):
        strictly(Message, {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m",
                           "stop_reason": "end_turn", "stop_sequence": None})
    with pytest.raises(ValueError, match="index"):
        strictly(RawMessageStreamEvent, {"type": "content_block_stop", "index": "0"})
