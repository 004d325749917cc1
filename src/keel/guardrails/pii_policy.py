"""What to do with the PII and secrets found in a text: per entity type, allow, redact or block.

Redaction is reversible within a call: the `Redactor` (one per call) replaces each value with a
placeholder such as `<EMAIL_ADDRESS_1>` and can put the values back in the answer. A block names the
entity types found, never their values.
"""

from __future__ import annotations

from collections.abc import Sequence

from keel.config import PiiAction, PiiConfig
from keel.errors import GuardrailViolation
from keel.guardrails.pii import Entity, PiiScanner
from keel.guardrails.redaction import Redactor
from keel.guardrails.verdicts import Direction, Verdict, add
from keel.wording import counted


class PiiPolicy:
    def __init__(self, config: PiiConfig, direction: Direction) -> None:
        self.config = config
        self.direction = direction
        # With `action: allow`, only the types named otherwise are looked for at all.
        watched = None if config.action != "allow" else {t for t, a in config.entities.items() if a != "allow"}
        self.scanner = PiiScanner(watched, score_threshold=config.score_threshold)

    def action(self, entity_type: str) -> PiiAction:
        return self.config.entities.get(entity_type, self.config.action)

    def find(self, text: str) -> list[Entity]:
        """The entities of `text` the policy does not allow."""
        return [e for e in self.scanner.scan(text) if self.action(e.type) != "allow"]

    def apply(self, text: str, redactor: Redactor, verdicts: list[Verdict], source: str | None = None) -> str:
        """`text` with what the policy redacts replaced; raises `GuardrailViolation` on a blocked type."""
        found = self.find(text)
        if not found:
            return text
        return self.judge(text, found, redactor, verdicts, source)

    def judge(
        self, text: str, found: Sequence[Entity], redactor: Redactor, verdicts: list[Verdict], source: str | None
    ) -> str:
        """Act on entities already found in `text` (a stream's released window)."""
        entities: dict[str, int] = {}
        for entity in found:
            entities[entity.type] = entities.get(entity.type, 0) + 1
        blocked = sorted(t for t in entities if self.action(t) == "block")
        if blocked:
            add(verdicts, Verdict(self.direction, "pii", "block", entities=entities, source=source))
            where = "the request" if self.direction == "input" else "the answer"
            raise GuardrailViolation(
                f"Blocked by the pii guardrail: {where} contains {counted(len(blocked), 'kind')} of sensitive data "
                f"this model may not {'receive' if self.direction == 'input' else 'return'} ({', '.join(blocked)}). "
                + ("Remove it and send again." if self.direction == "input" else ""),
                check="pii", direction=self.direction,
            )
        add(verdicts, Verdict(self.direction, "pii", "redact", entities=entities, source=source))
        return redactor.redact(text, [e for e in found if self.action(e.type) == "redact"])
