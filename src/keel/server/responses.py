"""JSON answers of the gateway, errors in OpenAI's shape among them: one serialisation each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi.responses import Response

from keel.errors import KeelError


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


# The body of an error in a dialect's own shape (Anthropic's `{"type": "error", ...}`); OpenAI's by default.
ErrorBody = Callable[[KeelError], dict[str, Any]]


def error_parts(
    exc: KeelError, status: int | None = None, body: ErrorBody | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (Retry-After, Allow, ...) and the body of an error: OpenAI's `{"error": {...}}`
    unless `body` gives the dialect's own."""
    headers = exc.headers()
    if exc.retried_by_keel:
        headers["x-should-retry"] = "false"  # the official SDKs (OpenAI's and Anthropic's) read "true" / "false"
    return status or exc.status, headers, orjson.dumps(body(exc) if body is not None else exc.body())


def error_response(exc: KeelError, status: int | None = None, body: ErrorBody | None = None) -> Response:
    code, headers, data = error_parts(exc, status, body)
    return Response(data, status_code=code, headers=headers, media_type="application/json")


def spec_nulls_dropped(body: dict[str, Any], completion: bool = False) -> dict[str, Any]:
    """`body` without the top-level nulls OpenAI's spec does not allow, whoever built it.

    `system_fingerprint` is an optional string, never null; a chat.completion's `usage` is an
    optional object, never null (a chunk's may be). Strict clients and validators refuse the
    nulls, lenient ones read a missing key the same way; two lookups per object.
    """
    if "system_fingerprint" in body and body["system_fingerprint"] is None:
        del body["system_fingerprint"]
    if completion and "usage" in body and body["usage"] is None:
        del body["usage"]
    return body
