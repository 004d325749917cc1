"""What the router decided for one call: the tiers it may use, the one chosen, and why.

`Tier` is one model a virtual model routes to (its config and deployments); `Choice` is a
strategy's decision; `Route` is what the call's context keeps (`ctx.route`): the answering tier and
the reason, sent as `x-keel-route`, logged and put on the span as `keel.route`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from keel.config import ModelConfig
    from keel.pipeline import Call
    from keel.providers.base import Deployment


@dataclass(frozen=True, slots=True)
class Tier:
    """One rung of a virtual model: a plain model of keel.yaml, with its deployments."""

    model: ModelConfig
    deployments: tuple[Deployment, ...]

    @property
    def name(self) -> str:
        return self.model.name


@dataclass(frozen=True, slots=True)
class Choice:
    """A strategy's decision: answer with tier `tier`; a cascade may escalate up to tier `up_to`."""

    tier: int
    reason: str
    up_to: int = -1  # -1: no escalation (the same as `tier`)

    @property
    def highest(self) -> int:
        return max(self.tier, self.up_to)


@dataclass(slots=True)
class Route:
    """The call's route (`ctx.route`): the tier that answers (the last one tried, after a cascade)."""

    model: str
    reason: str
    ladder: tuple[Tier, ...] = ()  # a cascade's tiers, from the one tried first; empty: no cascade
    escalations: int = 0
    tried: list[str] = field(default_factory=list)  # the tiers tried, in order (a cascade's escalations)

    def header(self) -> str:
        """The `x-keel-route` value: `fast; reason=complexity=0.12`."""
        return f"{self.model}; reason={self.reason}"

    def as_record(self) -> dict[str, object]:
        return {"model": self.model, "reason": self.reason, "escalations": self.escalations, "tried": self.tried}


class Strategy(Protocol):
    """Decides which of a virtual model's tiers answers a call (cheapest first)."""

    async def decide(self, call: Call, tiers: Sequence[Tier]) -> Choice: ...
