"""What a guardrail check found and what was done about it: one `Verdict` per check that found
something (or ran as a flag), kept on the call (`ctx.guardrails`). The request log stores them in its
`guardrails` column, the call's span carries them as `keel.guardrail` events, and `/metrics` counts
them (`keel_guardrail_verdicts_total{model,direction,check,action}`): all three from the record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Direction = Literal["input", "output"]
Action = Literal["allow", "flag", "redact", "block"]


@dataclass(slots=True)
class Verdict:
    direction: Direction
    check: str  # length | injection | pii | deny_pattern | off_topic | harmful
    action: Action  # what was done: block refused, redact rewrote, flag only recorded
    score: float | None = None  # the deciding score (0-1) where the check has one
    layers: dict[str, float] = field(default_factory=dict)  # injection: each layer's score
    reasons: list[str] = field(default_factory=list)  # names of what fired; never matched content
    entities: dict[str, int] = field(default_factory=dict)  # PII: counts by entity type
    source: str | None = None  # input: which content (user, system, tool, untrusted)
    ms: float | None = None  # how long the check took

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"direction": self.direction, "check": self.check, "action": self.action}
        for name in ("score", "source", "ms"):
            value = getattr(self, name)
            if value is not None:
                record[name] = round(value, 4) if isinstance(value, float) else value
        for name in ("layers", "reasons", "entities"):
            value = getattr(self, name)
            if value:
                record[name] = {k: round(v, 4) for k, v in value.items()} if name == "layers" else value
        return record



def add(verdicts: list[Verdict], verdict: Verdict) -> None:
    """Keep `verdict` on the call, merged into an earlier one of the same check, action and source
    (a request's many texts give one verdict per kind, not one per text)."""
    for kept in verdicts:
        if (kept.direction, kept.check, kept.action, kept.source) == (
            verdict.direction, verdict.check, verdict.action, verdict.source
        ):
            for name, count in verdict.entities.items():
                kept.entities[name] = kept.entities.get(name, 0) + count
            for layer, score in verdict.layers.items():
                kept.layers[layer] = max(kept.layers.get(layer, 0.0), score)
            kept.reasons.extend(r for r in verdict.reasons if r not in kept.reasons)
            if verdict.score is not None:
                kept.score = max(kept.score or 0.0, verdict.score)
            return
    verdicts.append(verdict)
