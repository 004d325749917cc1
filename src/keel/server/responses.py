"""JSON answers of the gateway, errors in OpenAI's shape among them: one serialisation each."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

from keel.errors import KeelError


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_response(exc: KeelError, status: int | None = None) -> Response:
    """`{"error": {...}}` with the error's status and headers (Retry-After, Allow, ...)."""
    return Response(
        orjson.dumps(exc.body()), status_code=status or exc.status, headers=exc.headers(),
        media_type="application/json",
    )
