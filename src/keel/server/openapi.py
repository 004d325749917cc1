"""Keel's OpenAPI document (`GET /openapi.json`): FastAPI's description of the routes it serves, plus the
hot routes the plain-ASGI gateway serves in front of it (chat, embeddings, and the dialects), each with
its request body, its answer (JSON, or an event stream when `stream` is true) and its error body.

Every operation's errors are documented as what Keel answers: OpenAI's `{"error": {...}}` (Anthropic's
`{"type": "error", ...}` on /v1/messages), never FastAPI's 422 `{"detail": ...}`. The model names are the
configured ones, so a client (or a fuzzer) reading the document knows what this gateway serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from keel.types import ChatRequest, EmbeddingRequest

REF = "#/components/schemas/{model}"
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    },
    "ErrorResponse": {"type": "object", "required": ["error"],
                      "properties": {"error": {"$ref": "#/components/schemas/Error"}}},
    "AnthropicErrorResponse": {
        "type": "object", "required": ["type", "error"],
        "properties": {"type": {"const": "error"}, "error": {
            "type": "object", "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
    },
}
ERROR = {"description": "An error in OpenAI's shape; the message says what to do next.",
         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
ANTHROPIC_ERROR = {"description": "An error in Anthropic's shape.",
                   "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AnthropicErrorResponse"}}}}
EVENT = {"type": "object", "required": ["data"],
         "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
STREAM = {"text/event-stream": {"schema": EVENT}}


def _answer(description: str, **required: Any) -> dict[str, Any]:
    """A 200: a JSON object with the `required` constant fields, or an event stream for `stream: true`."""
    schema = {"type": "object", "required": list(required),
              "properties": {name: {"const": value} for name, value in required.items()}}
    return {"description": description, "content": {"application/json": {"schema": schema}, **STREAM}}


def _model(names: Sequence[str]) -> dict[str, Any]:
    return {"type": "string", "enum": list(names)} if names else {"type": "string", "minLength": 1}


def _pydantic(model: type[BaseModel], names: Sequence[str], schemas: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    schemas.update(schema.pop("$defs", {}))
    schema["properties"]["model"] = _model(names)
    return schema


def _dialect(names: Sequence[str], required: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A dialect's body, described by its fields that matter; the rest pass on as the dialect's docs say."""
    return {"type": "object", "additionalProperties": True, "required": ["model", *required],
            "properties": {"model": _model(names), **required, **more,
                           "stream": {"type": ["boolean", "null"]}}}


TEXT = {"type": "string"}
# The dialects take null for an optional field, as left out (and so does the document).
NULLABLE_TEXT = {"type": ["string", "null"]}
COUNT = {"type": ["integer", "null"], "minimum": 1}
CHAT_MESSAGE = {"type": "object", "required": ["role", "content"],
                "properties": {"role": {"enum": ["user", "assistant"]}, "content": TEXT}}


def hot_operations(names: Sequence[str], schemas: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The POST operations of the hot routes, by path."""
    return {
        "/v1/chat/completions": _post(
            "Create a chat completion (OpenAI's chat API)", _pydantic(ChatRequest, names, schemas),
            _answer("A chat.completion, or chat.completion.chunk events then [DONE].", object="chat.completion")),
        "/v1/embeddings": _post(
            "Create embeddings (OpenAI's embeddings API)", _pydantic(EmbeddingRequest, names, schemas),
            {**_answer("A list of embeddings.", object="list"), "content": {"application/json": {
                "schema": {"type": "object", "required": ["object", "data"],
                           "properties": {"object": {"const": "list"}, "data": {"type": "array"}}}}}}),
        "/v1/responses": _post(
            "Create a response (OpenAI's Responses API; docs/responses-api.md)",
            # input may be left out: instructions alone, or a previous_response_id, make a conversation
            _dialect(names, {}, input={"anyOf": [TEXT, {"type": "array", "minItems": 1, "items": CHAT_MESSAGE}]},
                     instructions=NULLABLE_TEXT, store={"type": ["boolean", "null"]},
                     max_output_tokens=COUNT),  # OpenAI asks 16 at least; Keel takes any count
            _answer("A response object, or the Responses API's events.", object="response")),
        "/v1/messages": _post(
            "Create a message (Anthropic's Messages API; docs/messages-api.md)",
            _dialect(names, {"messages": {"type": "array", "minItems": 1, "items": CHAT_MESSAGE},
                             "max_tokens": {"type": "integer", "minimum": 1}},
                     system={"type": ["string", "array", "null"]}),  # text, or Anthropic's text blocks
            _answer("A message, or Anthropic's message events.", type="message"), error=ANTHROPIC_ERROR),
        "/v1/completions": _post(
            "Create a text completion (OpenAI's legacy completions API; docs/completions-api.md)",
            _dialect(names, {"prompt": {"anyOf": [TEXT, {"type": "array", "minItems": 1,
                                                         "items": TEXT}]}},
                     max_tokens=COUNT),
            _answer("A text_completion, or its chunk events then [DONE].", object="text_completion")),
    }


def _post(summary: str, body: dict[str, Any], answer: dict[str, Any],
          error: dict[str, Any] = ERROR) -> dict[str, Any]:
    return {"post": {"summary": summary, "security": [{"bearer": []}],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                     "responses": {"200": answer, "default": error}}}


def openapi_document(api: FastAPI, hot_paths: Sequence[str], model_names: Sequence[str]) -> dict[str, Any]:
    """FastAPI's document with the hot routes added and every error documented in Keel's shape."""
    document = api.openapi()
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, which Keel never sends
        schemas.pop(name, None)
    schemas.update(SCHEMAS)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "A Keel key: the master key or a virtual key."}}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses["default"] = ERROR
    hot = hot_operations(model_names, schemas)
    missing = set(hot_paths) - set(hot)
    if missing:
        raise RuntimeError(f"hot routes with no OpenAPI description: {sorted(missing)}")
    document["paths"] = {**{path: hot[path] for path in hot_paths}, **document.get("paths", {})}
    return document
