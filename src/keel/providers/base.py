"""What every provider offers, and the `Deployment` that binds one to its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from keel.errors import NotSupported
from keel.types import ChatRequest, EmbeddingRequest

if TYPE_CHECKING:
    from keel.config import Deployment as DeploymentConfig
    from keel.limits.concurrency import ConcurrencyLimit
    from keel.pipeline import Call, Reply
    from keel.reliability.breaker import CircuitBreaker
    from keel.reliability.slo_guard import SLOGuard


class Provider(Protocol):
    """One upstream (or the embedded model) for one deployment."""

    async def start(self) -> None:
        """Open pools, load weights; called once before the first call."""

    async def close(self) -> None:
        """Release everything; in-flight calls have finished."""

    async def chat(self, request: ChatRequest, call: Call) -> Reply: ...

    async def embed(self, request: EmbeddingRequest, call: Call) -> Reply: ...


class ChatOnly:
    """Mixin for providers that have no embeddings endpoint."""

    name: str

    async def embed(self, request: EmbeddingRequest, call: Call) -> Reply:
        raise NotSupported(
            f"deployment '{self.name}' cannot create embeddings; "
            "configure an 'openai' deployment for this model to serve /v1/embeddings",
            param="model",
        )


@dataclass(slots=True)
class Deployment:
    name: str
    config: DeploymentConfig
    provider: Provider
    breaker: CircuitBreaker
    slo: SLOGuard | None = None  # with the model's slo_guard on (keel.reliability.slo_guard)
    concurrency: ConcurrencyLimit | None = None  # `max_concurrency`: held by the reliability stage per attempt


def deployment_name(config: DeploymentConfig) -> str:
    if config.name:
        return config.name
    model = getattr(config, "model", None)
    return f"{config.provider}/{model}" if model else config.provider


def make_provider(config: DeploymentConfig, name: str) -> Provider:
    """The provider object for one deployment entry of keel.yaml."""
    if config.provider == "openai":
        from keel.providers.openai_compat import OpenAICompatProvider

        return OpenAICompatProvider(config, name)
    if config.provider == "anthropic":
        from keel.providers.anthropic import AnthropicProvider

        return AnthropicProvider(config, name)
    if config.provider == "local":
        from keel.providers.local import LocalProvider

        return LocalProvider(config, name)
    if config.provider == "local-embedder":
        from keel.providers.local_embedder import LocalEmbedderProvider

        return LocalEmbedderProvider(config, name)
    from keel.providers.simulated import SimulatedProvider

    return SimulatedProvider(config, name)


def completion_body(
    *, id: str, model: str, created: int, message: dict[str, Any], finish_reason: str | None,
    usage: dict[str, Any] | None, system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """A chat.completion object with every field strict clients expect."""
    message.setdefault("refusal", None)
    body = {
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }
    if system_fingerprint is not None:  # the spec allows a string or nothing, not null
        body["system_fingerprint"] = system_fingerprint
    return body


def chunk_body(
    *, id: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A chat.completion.chunk object; `usage` set makes it the trailing usage-only chunk."""
    choices = [] if usage is not None else [
        {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    ]
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "usage": usage}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
