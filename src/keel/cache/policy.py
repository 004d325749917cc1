"""Which calls the exact cache may serve and store: the request's determinism, the caller's
Cache-Control, and how the answer ended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keel.types import ChatRequest

# A finish the answer would have again: "length" too, as max_tokens is part of the key.
# Never "content_filter" (a filtered answer), nor an answer without a finish (cut short).
STORED_FINISHES = frozenset({"stop", "tool_calls", "length"})


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The request's `Cache-Control`: no-cache looks nothing up (the fresh answer is still stored),
    no-store stores nothing."""

    no_cache: bool = False
    no_store: bool = False

    @classmethod
    def parse(cls, header: str | None) -> CacheControl:
        if not header:
            return _NONE
        directives = {part.strip().split("=", 1)[0].lower() for part in header.split(",")}
        return cls(no_cache="no-cache" in directives, no_store="no-store" in directives)


_NONE = CacheControl()


def deterministic(request: ChatRequest, allow_nondeterministic: bool) -> bool:
    """Temperature 0 or a seed: the same request should get the same answer (or keel.yaml allows)."""
    return allow_nondeterministic or request.temperature == 0 or request.seed is not None


def storable(answer: dict[str, Any]) -> bool:
    """A whole answer of one choice that ended as a model ends: not filtered, not cut short."""
    choices: list[dict[str, Any]] = answer.get("choices") or []
    return len(choices) == 1 and choices[0].get("finish_reason") in STORED_FINISHES
