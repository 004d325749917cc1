"""The caller's JSON Schemas, checked like any other input before a model is asked to follow them.

A schema that is too large, not a JSON Schema (checked against its draft's metaschema), that refers
to something it does not define, or whose `$ref`s loop without ever reaching a value, is refused
with a 400 naming the parameter. A good one is compiled once into a validator, kept in a bounded
LRU keyed by the hash of its serialisation, since clients send the same few schemas again and again.

References are resolved inside the schema only: nothing is ever fetched (a schema is the caller's
input, and a `$ref` to a URL would let it make Keel send requests).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from referencing.exceptions import Unresolvable

from keel.errors import InvalidRequest

# 256 KB serialised: OpenAI's own structured outputs take far less (100 properties, 5 levels of
# nesting), a schema is sent with every call, and checking one is CPU on the event loop; a larger
# one is a mistake (a whole data file sent as a schema) or an attack, not a shape to answer in.
MAX_SCHEMA_BYTES = 256 * 1024
CACHE_SIZE = 256
NO_PARAMETERS: dict[str, Any] = {"type": "object"}  # a tool without parameters takes no arguments

# Keywords that apply their subschemas to the same value (no step into the instance): a `$ref`
# cycle through only these never ends.
_IN_PLACE = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref", "$dynamicRef")


class SchemaCache:
    """Compiled validators of the schemas seen lately, by hash of their serialisation."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._validators: OrderedDict[bytes, Validator] = OrderedDict()

    def __len__(self) -> int:
        return len(self._validators)

    def validator(self, schema: Any, param: str) -> Validator:
        """A validator of `schema` (the parameter `param` of the request), or an InvalidRequest."""
        try:
            serialised = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        except (orjson.JSONEncodeError, TypeError) as exc:
            raise InvalidRequest(f"Invalid schema in '{param}': it cannot be written as JSON ({exc}).",
                                 param=param) from None
        if len(serialised) > MAX_SCHEMA_BYTES:
            raise InvalidRequest(
                f"Invalid schema in '{param}': it is {len(serialised) // 1024} KB; at most {MAX_SCHEMA_BYTES // 1024} "
                "KB are accepted. Describe the answer's shape, not its data, and use $defs for repeated parts.",
                param=param,
            )
        key = hashlib.blake2b(serialised, digest_size=16).digest()
        found = self._validators.get(key)
        if found is not None:
            self._validators.move_to_end(key)
            return found
        compiled = compile_schema(schema, param)
        self._validators[key] = compiled
        if len(self._validators) > self.size:
            self._validators.popitem(last=False)
        return compiled


def compile_schema(schema: Any, param: str) -> Validator:
    """A validator for `schema` (Draft 2020-12 unless its `$schema` names another; formats not
    checked), after its metaschema and its references have been checked."""
    if not isinstance(schema, Mapping | bool):
        raise InvalidRequest(f"Invalid schema in '{param}': a JSON Schema is an object, got {type(schema).__name__}.",
                             param=param)
    try:
        cls = validator_for(schema, default=Draft202012Validator)
    except Exception:  # an unknown `$schema` URI
        raise InvalidRequest(
            f"Invalid schema in '{param}': '$schema' names a draft this server does not know "
            f"({_declared_draft(schema)!r}); leave it out for Draft 2020-12.", param=param,
        ) from None
    try:
        cls.check_schema(schema)  # type: ignore[arg-type]  # a bool schema is valid; the stubs say dict only
    except SchemaError as error:  # already the best match of the metaschema's errors
        raise InvalidRequest(f"Invalid schema in '{param}': {json_path(error.absolute_path)}: {error.message}.",
                             param=param) from None
    except RecursionError:
        raise InvalidRequest(f"Invalid schema in '{param}': it is nested too deeply to check.", param=param) from None
    validator: Validator = cls(schema)
    if isinstance(schema, Mapping):
        _check_references(validator, schema, param)
    return validator


def _declared_draft(schema: Mapping[str, Any] | bool) -> Any:
    return schema.get("$schema") if isinstance(schema, Mapping) else None


def _check_references(validator: Validator, schema: Mapping[str, Any], param: str) -> None:
    """Every local `$ref` resolves, and none loops back to itself without stepping into the value."""
    if _has_nested_ids(schema):
        return  # relative references depend on the nearest `$id`: checked as they are used instead
    # jsonschema's resolver over this schema alone (nothing is fetched); not in its public API or stubs
    resolver = validator._resolver  # type: ignore[attr-defined]
    targets: dict[int, Any] = {}
    for node in _nodes(schema):
        ref = node.get("$ref")
        if not isinstance(ref, str):
            continue
        try:
            targets[id(node)] = resolver.lookup(ref).contents
        except Unresolvable:
            raise InvalidRequest(
                f"Invalid schema in '{param}': $ref {ref!r} points at nothing in the schema (only references "
                "inside it, such as '#/$defs/Name', are followed; nothing is fetched).", param=param,
            ) from None
    for node in _nodes(schema):
        if "$ref" in node and _loops(node, targets):
            raise InvalidRequest(
                f"Invalid schema in '{param}': $ref {node['$ref']!r} refers back to itself without describing "
                "any value (a loop of references); recursion must go through properties or items.", param=param,
            )


def _loops(start: Mapping[str, Any], targets: Mapping[int, Any]) -> bool:
    """Whether following in-place keywords from `start` comes back to it (iterative: no recursion)."""
    seen: set[int] = set()
    stack: list[Any] = [targets.get(id(start))]
    while stack:
        node = stack.pop()
        if not isinstance(node, Mapping) or id(node) in seen:
            continue
        if node is start:
            return True
        seen.add(id(node))
        for key in _IN_PLACE:
            value = node.get(key)
            if key in ("$ref", "$dynamicRef"):
                stack.append(targets.get(id(node)) if key == "$ref" else None)
            elif isinstance(value, list):
                stack.extend(value)
            elif isinstance(value, Mapping):
                stack.append(value)
    return False


def _nodes(schema: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every object in the schema, the schema itself included (iterative: depth costs no stack)."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _has_nested_ids(schema: Mapping[str, Any]) -> bool:
    return any("$id" in node and node is not schema for node in _nodes(schema))


def json_path(path: Any) -> str:
    """`$.items[2].price` for jsonschema's path (a deque of keys and indexes)."""
    text = "$"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text
