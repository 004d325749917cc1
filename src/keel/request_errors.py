"""Turning a client's request body into wire types, with errors worded the way OpenAI words them.

The gateway and the library validate through here, so both answer a bad parameter alike:
the parameter as the client wrote it (`messages[0].content`), what was expected and what came.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from keel.errors import InvalidRequest
from keel.validation_errors import path_text, reworded, shown

M = TypeVar("M", bound=BaseModel)

# Arrays and objects inside one another, the body itself included: as deep as orjson writes
# (an upstream call is the body written again). Deeper bodies are refused before anything walks
# them: pydantic's error rendering and the request log's redaction recurse too.
MAX_NESTING = 254


def parse_request(cls: type[M], data: Any, *, strict: bool) -> M:
    """`data` as a `cls`, or an InvalidRequest naming the parameter at fault."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"The request body must be a JSON object ({{...}}), got {json_kind(data)}.")
    check_nesting(data)
    try:
        return cls.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise invalid_request(exc, data) from None


# Pydantic error types that mean "wrong JSON type", and the type that was expected.
_EXPECTED = {
    "string_type": "a string", "list_type": "an array", "int_type": "an integer", "float_type": "a number",
    "bool_type": "a boolean", "dict_type": "an object", "model_type": "an object",
    "model_attributes_type": "an object", "none_required": "null",
}


def invalid_request(exc: ValidationError, data: Any) -> InvalidRequest:
    """The clearest one of pydantic's errors, as OpenAI words them: the parameter as the client
    wrote it (`messages[0].content`), what was expected and what came."""
    found = exc.errors(include_url=False)
    places = [_place(error, data) for error in found]
    # Union branches each report their own failure. The one that got deepest into the body
    # says what is wrong, and among equals a branch that took the type but refused the value.
    best = max(range(len(found)), key=lambda i: (len(places[i][1]), found[i]["type"] not in _EXPECTED))
    error, (param, path) = found[best], places[best]
    same = [found[i] for i in range(len(found)) if places[i][0] == param]
    kind, got = error["type"], shown(error["input"], as_json=True)
    if kind in ("missing", "union_tag_not_found"):
        message = f"Missing required parameter '{param}'."
    elif kind == "union_tag_invalid":
        tag, expected_tags = shown(error["ctx"]["tag"], as_json=True), error["ctx"]["expected_tags"]
        message = f"Invalid value for '{param}': {tag} is not one of {expected_tags}."
    elif all(e["type"] in _EXPECTED for e in same):
        expected = " or ".join(dict.fromkeys(_EXPECTED[e["type"]] for e in same))
        message = f"Invalid type for '{param}': expected {expected}, got {got}."
    elif kind == "too_short":
        least = error["ctx"]["min_length"]
        message = f"Invalid value for '{param}': it must hold at least {least} item{'s' * (least != 1)}, got {got}."
    elif kind == "string_too_short":
        message = f"Invalid value for '{param}': it must not be empty."
    elif kind == "string_too_long" and error["loc"][-1] == "[key]":
        param = param.rpartition(".")[0] or param  # the object, not a parameter named by the key
        most = error["ctx"]["max_length"]
        message = (f"Invalid key in '{param}': {got} is {len(error['input'])} characters long; "
                   f"keys may be at most {most}.")
    elif kind == "string_too_long":
        most = error["ctx"]["max_length"]
        message = (f"Invalid value for '{param}': it is {len(error['input'])} characters long; "
                   f"at most {most} are accepted.")
    elif kind == "too_long":
        most, field_type = error["ctx"]["max_length"], error["ctx"]["field_type"]
        items = "pairs" if field_type == "Dictionary" else "items"
        message = (f"Invalid value for '{param}': it holds {len(error['input'])} {items}; "
                   f"at most {most} are accepted.")
    else:
        message = f"Invalid value for '{param}': {_as_clause(str(error['msg']))} (got {got})."
    # Other places in the body, not the union alternatives tried on the way to this one.
    others = {p for p, steps in places if p != param and steps != path[: len(steps)]}
    if others:
        message += f" {len(others)} more invalid parameter{'s' * (len(others) > 1)}: {', '.join(sorted(others))}."
    return InvalidRequest(message, param=param)


def check_nesting(body: dict[str, Any]) -> None:
    """Refuse a body nested deeper than MAX_NESTING levels, naming the top-level parameter that
    is. orjson's writer finds out in C (about 2 us for a usual body); a walk in Python took 10 times that."""
    try:
        orjson.dumps(body)  # parsed JSON always writes back, unless nested too deep
    except TypeError:
        name = next((key for key, value in body.items() if not _writable(value)), "(body)")
        raise InvalidRequest(
            f"Invalid value for '{name}': arrays and objects are nested more than {MAX_NESTING} levels deep "
            f"in the request body, the most accepted. Flatten '{name}'.",
            param=name if name != "(body)" else None,
        ) from None


def _writable(value: Any) -> bool:
    try:
        orjson.dumps([value])  # one level down in the body, as here
    except TypeError:
        return False
    return True


def _as_clause(msg: str) -> str:
    """Pydantic's sentence as the second half of ours: "it should be ..."."""
    clause = reworded(msg)
    return "it " + clause if clause.startswith("should") else clause


def _place(error: Any, data: Any) -> tuple[str, list[str | int]]:
    """Where in the body an error is: pydantic's location without the union branches it tried."""
    loc: tuple[str | int, ...] = error["loc"]
    path: list[str | int] = []
    node = data
    for n, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif error["type"] == "missing" and n == len(loc) - 1:
            pass  # the missing key itself
        else:
            continue  # a union branch or tag pydantic tried, not a place in the body
        path.append(part)
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        path.append(str(error["ctx"]["discriminator"]).strip("'"))
    return path_text(path, top="(body)"), path


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, dict) else "an array"


