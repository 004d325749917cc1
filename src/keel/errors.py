"""Keel's errors: each class knows its HTTP status, OpenAI error type and code.

The gateway turns any `KeelError` into OpenAI's error body in one place; the reliability
stage reads `retryable` and `fallback` to decide what to do next. Which answers tell clients
not to retry, and which carry a Retry-After, is tabled in docs/gateway.md ("Retrying").
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class KeelError(Exception):
    """Base of every error Keel raises on purpose."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    code: ClassVar[str | None] = None
    retryable: ClassVar[bool] = False  # worth another attempt on the same deployment
    fallback: ClassVar[bool] = False  # worth trying the next deployment
    # What is left after the reliability stage's retries and fallbacks: the gateway adds
    # `x-should-retry: false`, so OpenAI's SDKs do not retry (and sleep) on top of Keel.
    retried_by_keel: ClassVar[bool] = False

    def __init__(
        self, message: str, *, param: str | None = None, deployment: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.deployment = deployment
        self.retry_after = retry_after  # seconds; sent as Retry-After (whole seconds, at least 1)

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(max(1, math.ceil(self.retry_after)))} if self.retry_after else {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------- the client's mistakes


class InvalidRequest(KeelError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class HeadersTooLarge(InvalidRequest):
    status = 431
    code = "request_headers_too_large"


class AuthenticationFailed(KeelError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotAllowed(KeelError):
    """A virtual key asked for a model outside its allowed list."""

    status = 403
    type = "permission_error"
    code = "model_not_allowed"
    outcome: ClassVar[str] = "invalid"


class AdminForbidden(KeelError):
    """A key that may call models but not this admin action (or not another tenant's data)."""

    status = 403
    type = "permission_error"
    code = "forbidden"
    outcome: ClassVar[str] = "invalid"


class KeysUnavailable(KeelError):
    """The database holding the virtual keys cannot be read: no key can be checked."""

    status = 503
    type = "api_error"
    code = "keys_unavailable"


class ModelNotFound(KeelError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(f"The model '{model}' does not exist. Models served here: {listed}.", param="model")


class NotSupported(InvalidRequest):
    """This deployment cannot do what was asked (embeddings, forced tools); a later one may."""

    code = "unsupported"
    fallback = True


# ---------------------------------------------------------------------------- the upstream's failures


class UpstreamError(KeelError):
    """A deployment failed in a way a client cannot fix."""

    status = 502
    type = "api_error"
    code = "upstream_error"
    retryable = True
    fallback = True
    retried_by_keel = True


class UpstreamServerError(UpstreamError):
    code = "upstream_server_error"

    def __init__(self, message: str, *, upstream_status: int = 500, deployment: str | None = None) -> None:
        super().__init__(message, deployment=deployment)
        self.upstream_status = upstream_status


class UpstreamConnectionError(UpstreamError):
    code = "upstream_connection_error"


class UpstreamMalformed(UpstreamError):
    code = "upstream_malformed_response"


class UpstreamRedirected(UpstreamError):
    """The deployment answered 3xx: its base_url has moved. Another attempt gets the same answer;
    another deployment may work."""

    code = "upstream_redirected"
    retryable = False


class UpstreamResponseTooLarge(UpstreamError):
    """The answer passed the deployment's max_response_mb: read no further, never held whole."""

    code = "upstream_response_too_large"
    retryable = False


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout_error"
    code = "timeout"


class StreamStalled(UpstreamTimeout):
    code = "stream_stalled"


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamBadRequest(KeelError):
    """The upstream refused the request itself: never retried, the same request fails again."""

    status = 400
    type = "invalid_request_error"
    code = "upstream_bad_request"


class UpstreamAuthFailed(UpstreamError):
    """The deployment's own key was refused: the operator must fix it; another deployment may work."""

    status = 502
    code = "upstream_auth_failed"
    retryable = False


class ContextLengthExceeded(UpstreamBadRequest):
    """Too long for this deployment; a later deployment with a larger window may take it."""

    code = "context_length_exceeded"
    fallback = True


class Overloaded(KeelError):
    """Keel's own capacity is full (the local model's queue); try again shortly.

    The next deployment is tried at once; when none is left, the call waits the Retry-After
    (an estimate of the queue's drain) and tries again, within its deadline. The wait is a
    sleep outside the queue, so the queue stays bounded."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"
    retryable = True
    fallback = True
    retried_by_keel = True

    def __init__(self, message: str, *, retry_after: float = 1.0, deployment: str | None = None) -> None:
        super().__init__(message, deployment=deployment, retry_after=retry_after)


class ConcurrencyExceeded(Overloaded):
    """A call found its key's or its deployment's calls in flight at their limit (`max_concurrency`) and no
    slot freed within its bounded wait: shed with 503, never queued without bound. Another deployment may
    have room (`fallback`); Keel does not retry it itself (the wait was the retry): the client may, after
    Retry-After."""

    status = 503
    type = "server_error"
    retryable = False
    retried_by_keel = False

    def __init__(self, message: str, *, retry_after: float, scope: str, deployment: str | None = None) -> None:
        super().__init__(message, retry_after=retry_after, deployment=deployment)
        self.scope = scope  # "key" or "deployment"


class CircuitOpen(UpstreamError):
    """Every deployment of the model is paused by its breaker. `retry_after` says when one
    probes, but it is not sent as Retry-After: at that moment one call goes through as the
    probe and every other is refused again, so clients told to come back then would arrive
    together and mostly fail. The message says how long the pause lasts."""

    status = 503
    code = "circuit_open"

    def headers(self) -> dict[str, str]:
        return {}


class SLOShed(KeelError):
    """Every deployment of the model breaks the `slo` targets and its `slo_guard.action` is `shed`:
    refused at once, with a Retry-After for when the oldest of their recent calls leaves the window."""

    status = 503
    type = "api_error"
    code = "overloaded"


class ModelNotLoaded(KeelError):
    """The embedded model's files are missing: say what to install."""

    status = 503
    code = "model_not_installed"


# ---------------------------------------------------------------------------- budgets


class BudgetExceeded(KeelError):
    """A spend cap would be passed if this call ran at its worst-case cost: refused before any
    money is spent. When the budget itself is spent, retrying is pointless until the window resets;
    when calls in flight hold the rest, it is worth another try once they finish (`transient`)."""

    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"

    def __init__(
        self, message: str, *, scope: str, window: str, limit_usd: float, resets_in: float | None,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.scope = scope
        self.window = window
        self.limit_usd = limit_usd
        self.resets_in = resets_in  # seconds until the window resets; None: it never does ("total")
        self.transient = transient
        self.alerts: list[Any] = []  # budget alerts this refusal raised (keel.budgets.Alert); the stage sends them

    def headers(self) -> dict[str, str]:
        if self.transient:
            return {"retry-after": "1"}
        # OpenAI's SDKs retry a 429 unless told not to; a spent budget does not come back in seconds.
        headers = {"x-should-retry": "false"}
        if self.resets_in is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.resets_in)))
        return headers


class BudgetStoreUnavailable(KeelError):
    """The shared budget counters (Redis) cannot be reached: calls are refused rather than let
    through unmetered."""

    status = 503
    type = "api_error"
    code = "budget_store_unavailable"


# ---------------------------------------------------------------------------- rate limits


class RateLimited(KeelError):
    """A rate limit of Keel's own (requests or tokens per minute) is reached: refused before any
    money is reserved. Worth another try after Retry-After, so the answer says so (`x-should-retry:
    true`, which OpenAI's SDKs obey, and `retry-after-ms`, which they prefer)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    outcome: ClassVar[str] = "rate_limited"

    def __init__(self, message: str, *, scope: str, kind: str, retry_after: float | None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.scope = scope  # global | key | user | model
        self.kind = kind  # requests | tokens

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {"x-should-retry": "false"}
        wait = max(self.retry_after, 0.001)
        return {"retry-after": str(max(1, math.ceil(wait))), "retry-after-ms": str(math.ceil(wait * 1000)),
                "x-should-retry": "true"}


class RequestOverRateLimit(RateLimited):
    """A request whose tokens alone exceed a tokens-per-minute limit: it can never fit, however
    long the client waits. 429 `rate_limit_exceeded` as OpenAI answers the same case ("Request too
    large ... on tokens per min"), but with `x-should-retry: false` and no Retry-After."""

    def __init__(self, message: str, *, scope: str) -> None:
        super().__init__(message, scope=scope, kind="tokens", retry_after=None)


class RateLimitStoreUnavailable(KeelError):
    """The shared rate-limit counters (Redis) cannot be reached and `limits.on_backend_error` is
    `fail_closed`: calls are refused rather than let through unlimited."""

    status = 503
    type = "api_error"
    code = "rate_limit_store_unavailable"


# ---------------------------------------------------------------------------- guardrails


class GuardrailViolation(KeelError):
    """A guardrail check with action `block` refused the call (input) or its answer (output). The
    message names the check, never what it matched: echoing a secret or an attack back helps no one."""

    status = 400
    type = "invalid_request_error"
    code = "guardrail_violation"
    outcome: ClassVar[str] = "blocked"
    retried_by_keel = True  # the same request would be refused again: the SDKs must not retry

    def __init__(self, message: str, *, check: str, direction: str) -> None:
        super().__init__(message)
        self.check = check  # injection | pii | length | deny_pattern | off_topic | harmful
        self.direction = direction  # input | output


# ---------------------------------------------------------------------------- structured outputs


class InvalidOutput(KeelError):
    """The model's JSON answer or tool call did not match the caller's schema, after the re-asks and
    the other deployments (keel.validation). 422: OpenAI's SDKs raise `UnprocessableEntityError` and
    do not retry it; the type is `invalid_request_error` because what the caller can change is in the
    request (a simpler schema, a larger max_tokens, another model). The message names the failing path."""

    status = 422
    type = "invalid_request_error"
    code = "invalid_output"
    retried_by_keel = True  # Keel already re-asked: the SDKs must not retry on top
