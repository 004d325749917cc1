"""OpenAI's own API description as a test oracle: `validate("CreateChatCompletionResponse", body)`.

The spec (tests/data/openai-spec/openapi.json, OpenAPI 3.1, trimmed to the schemas used here)
still marks some fields with 3.0-style `nullable: true`, which JSON Schema ignores; they are
rewritten to allow `null` before validating with jsonschema (Draft 2020-12). `$ref`s resolve
through a referencing Registry holding the whole document, so every schema keeps its references
to the others.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parent / "data" / "openai-spec" / "openapi.json"
SPEC_URI = "urn:openai:openapi.json"

# The schemas the gateway's answers must satisfy.
CHAT_COMPLETION = "CreateChatCompletionResponse"
CHAT_CHUNK = "CreateChatCompletionStreamResponse"
EMBEDDINGS = "CreateEmbeddingResponse"
MODELS = "ListModelsResponse"
ERROR = "ErrorResponse"
COMPLETION = "CreateCompletionResponse"  # legacy /v1/completions: answers and stream chunks alike

def normalise_nullable(node: Any) -> Any:
    """A copy of `node` with every `nullable: true` turned into a JSON Schema that accepts null."""
    if isinstance(node, list):
        return [normalise_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: normalise_nullable(value) for key, value in node.items()}
    if out.pop("nullable", False) is not True:
        return out
    kind = out.get("type")
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    if isinstance(kind, str):
        out["type"] = [kind, "null"]
        return out
    if isinstance(kind, list):
        out["type"] = kind if "null" in kind else [*kind, "null"]
        return out
    if any(key in out for key in ("$ref", "anyOf", "oneOf", "allOf", "properties", "items", "const")):
        # No type to extend: either the schema as written, or null.
        annotations = {k: out.pop(k) for k in ("description", "title", "default", "example") if k in out}
        return {"anyOf": [out, {"type": "null"}], **annotations}
    return out  # a schema without constraints already accepts null


@cache
def _registry() -> Registry[Any]:
    spec = normalise_nullable(json.loads(SPEC_PATH.read_text(encoding="utf-8")))
    registry: Registry[Any] = Registry().with_resource(
        SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    return registry


@cache
def validator(schema_name: str) -> Draft202012Validator:
    registry = _registry()
    schemas = registry.contents(SPEC_URI)["components"]["schemas"]
    if schema_name not in schemas:
        raise KeyError(
            f"the OpenAI spec in {SPEC_PATH} has no schema named {schema_name!r}: "
            "add it to ROOTS in tests/data/trim_openai_spec.py and run that on the full spec"
        )
    schema = {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}
    return Draft202012Validator(schema, registry=registry)


def errors(schema_name: str, obj: Any) -> list[str]:
    """Every way `obj` breaks the schema, one readable line each."""
    found = sorted(validator(schema_name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [_describe(error) for error in found]


def validate(schema_name: str, obj: Any) -> None:
    """Raise AssertionError naming each place where `obj` breaks OpenAI's schema `schema_name`."""
    problems = errors(schema_name, obj)
    if problems:
        shown = json.dumps(obj)[:1500]
        raise AssertionError(f"{schema_name} violated:\n  " + "\n  ".join(problems) + f"\nobject: {shown}")


def _describe(error: ValidationError) -> str:
    # anyOf/oneOf failures hide the useful reason in their context; best_match digs it out.
    best = best_match([error]) or error
    where = "/".join(str(p) for p in best.absolute_path) or "(top level)"
    return f"{where}: {best.message[:300]}"
