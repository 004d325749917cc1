"""One record per call that reaches Keel: the source of every number Keel shows.

The observe stage fills one in for every outcome (answered, failed, blocked, rate-limited,
served from cache, closed by the client); the writer batches it into the store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Outcome = Literal["ok", "error", "blocked", "rate_limited", "budget_exceeded", "cached", "client_closed", "invalid"]

# Free-form tags come from clients: bounded before they are stored.
MAX_TAG_CHARS = 128
MAX_METADATA_CHARS = 4096


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    started_at: float  # unix seconds
    ended_at: float
    endpoint: Literal["chat", "embeddings"] = "chat"
    trace_id: str | None = None
    span_id: str | None = None
    key_id: str | None = None
    user: str | None = None
    feature: str | None = None
    model: str | None = None  # the virtual model asked for
    deployment: str | None = None  # the deployment that answered (or failed last)
    upstream_model: str | None = None  # the upstream's own `model` in its answer
    system_fingerprint: str | None = None
    stream: bool = False
    attempts: int = 0
    fallbacks: int = 0  # answers from a deployment other than the first
    attempt_log: list[dict[str, Any]] = field(default_factory=list)
    cache_status: str = "none"  # none | miss | hit_exact | hit_semantic
    guardrails: list[dict[str, Any]] = field(default_factory=list)
    input: Any = None  # the messages (or embedding input), redacted; None when content logging is off
    output: Any = None  # the answer message, redacted
    metadata: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    cost_nanousd: int = 0  # the exact cost (1e-9 USD): what budget counters add up
    cost_estimated: bool = False  # tokens counted by Keel because the upstream gave no usage
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    upstream_ms: float | None = None
    status: int = 200
    outcome: Outcome = "ok"
    error_type: str | None = None  # the error code, e.g. "timeout", "budget_exceeded"
    error_message: str | None = None
    # The call's own spans (the call and each upstream attempt) as SpanRecord dicts: kept in the
    # record's row, one write per call instead of three; RecordStore.spans() unpacks them.
    spans: list[dict[str, Any]] = field(default_factory=list)
    tenant: str | None = None  # the virtual key's tenant
    # A cache hit: what the answer cost when it was stored (USD). None when the call was not a hit.
    cost_saved_usd: float | None = None
    # The API the client spoke (chat.completions, embeddings, responses, messages, completions);
    # None for a call made in-process through the library (revision 0005).
    dialect: str | None = None
    # The prompt template and version the call was rendered from (keel.prompts; revision 0006).
    prompt: str | None = None
    prompt_version: str | None = None
    # A deployment that answered has no known price: the cost above is unknown, not 0 (revision 0009).
    cost_unpriced: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bounded(value: str | None, limit: int = MAX_TAG_CHARS) -> str | None:
    """A client-given tag cut to `limit` characters."""
    if value is None:
        return None
    return value if len(value) <= limit else value[:limit]


@dataclass(slots=True)
class SpanRecord:
    """A finished OpenTelemetry span, kept in the store so the dashboard can draw traces."""

    trace_id: str  # 32 hex chars
    span_id: str  # 16 hex chars
    parent_id: str | None
    name: str
    started_at: float  # unix seconds
    ended_at: float
    status: Literal["ok", "error", "unset"] = "unset"
    attributes: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        # Shallow: attributes are plain values, and this runs once per span.
        return {name: getattr(self, name) for name in self.__slots__}
