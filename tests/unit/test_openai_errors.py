"""An OpenAI-compatible upstream's error answers become precise errors the reliability stage can act on."""

from __future__ import annotations

import email.utils
import time

import orjson
import pytest

from keel.errors import (
    ContextLengthExceeded,
    KeelError,
    UpstreamAuthFailed,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamTimeout,
)
from keel.providers.openai_compat import retry_after, upstream_error


def body(message: str, code: str | None = None) -> str:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).decode()


@pytest.mark.parametrize(("status", "kind", "retryable", "fallback"), [
    (429, UpstreamRateLimited, True, True),
    (500, UpstreamServerError, True, True),
    (503, UpstreamServerError, True, True),
    (408, UpstreamTimeout, True, True),
    (504, UpstreamTimeout, True, True),
    (401, UpstreamAuthFailed, False, True),
    (403, UpstreamAuthFailed, False, True),
    (400, UpstreamBadRequest, False, False),
    (422, UpstreamBadRequest, False, False),
])
def test_each_status_maps_to_its_error_class(
    status: int, kind: type[KeelError], retryable: bool, fallback: bool
) -> None:
    error = upstream_error(status, body("nope"), {}, "dep")
    assert type(error) is kind
    assert (error.retryable, error.fallback) == (retryable, fallback)
    assert error.deployment == "dep" and f"answered {status}" in error.message


def test_a_bad_request_is_never_retried_but_context_length_may_fall_back() -> None:
    plain = upstream_error(400, body("messages[0] is bad"), {}, "dep")
    too_long = upstream_error(400, body("This model's maximum context length is 8192 tokens",
                                        "context_length_exceeded"), {}, "dep")
    worded = upstream_error(400, body("Please reduce the length: context length exceeded"), {}, "dep")
    assert not plain.retryable and not plain.fallback
    assert isinstance(too_long, ContextLengthExceeded) and isinstance(worded, ContextLengthExceeded)
    assert too_long.fallback and not too_long.retryable


def test_the_upstreams_key_never_appears_in_the_message() -> None:
    error = upstream_error(401, body("Incorrect API key provided: sk-abc123"), {}, "dep")
    assert "sk-abc123" not in error.message and "api_key_env" in error.message


def test_a_body_that_is_not_json_is_quoted_briefly() -> None:
    error = upstream_error(502, "<html>" + "x" * 2000 + "</html>", {}, "dep")
    assert isinstance(error, UpstreamServerError) and len(error.message) < 600


def test_retry_after_in_seconds_milliseconds_and_http_dates() -> None:
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (retry_after({"retry-after": later}) or 0) <= 31
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None
    assert retry_after({"retry-after": "-5"}) == 0.0


def test_a_rate_limit_carries_its_retry_after_to_the_client() -> None:
    error = upstream_error(429, body("slow down"), {"retry-after": "3"}, "dep")
    assert isinstance(error, UpstreamRateLimited) and error.retry_after == 3.0
    assert error.headers() == {"retry-after": "3"}
