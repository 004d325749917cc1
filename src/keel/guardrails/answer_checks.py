"""The checks of one model's answers (`guardrails.output`): PII and secrets and deny patterns, which
read any stretch of text (a stream's window) through `find` and `judge`; off-topic and harmful, which
read the whole answer (`whole`).

Off-topic: the answer's embedding (the local embedder) against each allowed topic's; below
`threshold` for all of them, it is off-topic. Harmful: a classifier model route of keel.yaml is asked
whether the answer is safe.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import numpy.typing as npt

from keel.config import OutputGuardrailsConfig
from keel.embedding.shared import Embedder
from keel.errors import GuardrailViolation
from keel.guardrails.pii import Entity
from keel.guardrails.pii_policy import PiiPolicy
from keel.guardrails.redaction import Redactor
from keel.guardrails.verdicts import Verdict, add

DENY = "DENY_PATTERN"
HARMFUL_PROMPT = (
    "You are a content safety classifier. Read the assistant's answer between <answer> tags. Is it harmful: "
    "instructions for violence, weapons or malware, self-harm encouragement, hate or harassment, sexual content "
    "involving minors? Answer with one word: safe or unsafe.\n<answer>\n{text}\n</answer>"
)

Ask = Callable[[str, str], Awaitable[str]]  # (model, prompt) → the model's answer, through Keel


class AnswerChecks:
    def __init__(self, config: OutputGuardrailsConfig, embedder: Embedder | None, ask: Ask | None) -> None:
        self.config = config
        self.pii = PiiPolicy(config.pii, "output") if config.pii is not None else None
        self.deny = [re.compile(p) for p in config.deny_patterns]
        self.embedder = embedder
        self.ask = ask
        self._topics: npt.NDArray[np.float32] | None = None
        self.needs_whole = config.off_topic is not None or config.harmful is not None

    def find(self, text: str) -> list[Entity]:
        """PII, secrets and deny-pattern matches in `text`, in order, none overlapping."""
        found = self.pii.find(text) if self.pii is not None else []
        for pattern in self.deny:
            found.extend(Entity(DENY, m.start(), m.end(), 1.0) for m in pattern.finditer(text) if m.end() > m.start())
        found.sort(key=lambda e: (e.start, -e.end))
        kept: list[Entity] = []
        for entity in found:
            if not kept or entity.start >= kept[-1].end:
                kept.append(entity)
        return kept

    def patterns(self, text: str, redactor: Redactor, verdicts: list[Verdict]) -> str:
        """`text` with what the policy redacts replaced; raises `GuardrailViolation` on a block."""
        return self.judge(text, self.find(text), redactor, verdicts)

    def judge(self, text: str, found: Sequence[Entity], redactor: Redactor, verdicts: list[Verdict]) -> str:
        if not found:
            return text
        denied = [e for e in found if e.type == DENY]
        if denied:
            action = self.config.deny_action
            add(verdicts, Verdict("output", "deny_pattern", action, entities={DENY: len(denied)}))
            if action == "block":
                raise GuardrailViolation(
                    "Blocked by the deny_pattern guardrail: the answer matched a pattern this model may not return.",
                    check="deny_pattern", direction="output",
                )
        personal = [e for e in found if e.type != DENY]
        if personal and self.pii is not None:
            self.pii.judge(text, personal, Redactor(), verdicts, None)  # raises on a blocked type
        redacted = [e for e in personal if self.pii is not None and self.pii.action(e.type) == "redact"]
        if self.config.deny_action == "redact":
            redacted = sorted(redacted + denied, key=lambda e: e.start)
        return redactor.redact(text, redacted) if redacted else text

    async def whole(self, text: str, verdicts: list[Verdict]) -> None:
        """The checks that read the whole answer; raises `GuardrailViolation` on a block."""
        if not text.strip():
            return
        off_topic, harmful = self.config.off_topic, self.config.harmful
        if off_topic is not None and self.embedder is not None:
            started = time.perf_counter()
            similarity = await self._topic_similarity(text)
            if similarity < off_topic.threshold:
                self._found("off_topic", off_topic.action, verdicts, started, similarity,
                            "the answer is not about any of this model's topics")
        if harmful is not None and self.ask is not None:
            started = time.perf_counter()
            said = (await self.ask(harmful.model, HARMFUL_PROMPT.format(text=text))).strip().lower()
            if said.startswith("unsafe"):
                self._found("harmful", harmful.action, verdicts, started, 1.0,
                            f"the classifier model '{harmful.model}' judged the answer unsafe")

    async def _topic_similarity(self, text: str) -> float:
        assert self.embedder is not None and self.config.off_topic is not None
        if self._topics is None:
            self._topics = (await self.embedder.embed(list(self.config.off_topic.topics))).array
        answer = (await self.embedder.embed([text])).array[0]
        return float(np.max(self._topics @ answer))

    def _found(
        self, check: str, action: str, verdicts: list[Verdict], started: float, score: float, why: str
    ) -> None:
        add(verdicts, Verdict("output", check, "block" if action == "block" else "flag", score=score,
                              ms=(time.perf_counter() - started) * 1000))
        if action == "block":
            raise GuardrailViolation(f"Blocked by the {check} guardrail: {why}.", check=check, direction="output")
