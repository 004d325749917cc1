"""JSON answers of the gateway, errors in OpenAI's shape among them: one serialisation each."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

from keel.errors import KeelError


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_parts(exc: KeelError, status: int | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (Retry-After, Allow, ...) and the `{"error": {...}}` body of an error."""
    headers = exc.headers()
    if exc.retried_by_keel:
        headers["x-should-retry"] = "false"  # the official SDKs read exactly "true" / "false"
    return status or exc.status, headers, orjson.dumps(exc.body())


def error_response(exc: KeelError, status: int | None = None) -> Response:
    code, headers, body = error_parts(exc, status)
    return Response(body, status_code=code, headers=headers, media_type="application/json")


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
