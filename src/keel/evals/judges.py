"""LLM-as-judge: a model scores an answer against the case's question, reference and criteria with a
rubric (docs/evals-judges.md).

A judge's own answer is untrusted output like any other: it is asked for JSON under a schema
(`{"score": 1..5, "reason": ...}` or `{"verdict": "pass"|"fail", "reason": ...}`), checked with the
validation stage's own checker, re-asked once with what was wrong, and otherwise the case is left
unscored (`Score(value=None, reason="judge answer invalid: ...")`), never guessed. The judge calls its
model through an `Ask` (chat-request params in, chat.completion body out); in production that is
`judge_ask(keel)`, so every judge call goes through Keel's pipeline: logged under the feature
`keel.judge`, priced, within budgets.

Self-preference (a model favours answers in its own style) cannot be corrected here, only flagged: a
judge that is the model it judges records a warning, on itself and in each score's details.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import orjson
from jsonschema import Draft202012Validator

from keel.errors import InvalidOutput
from keel.evals import suite as suites
from keel.evals.dataset import Case
from keel.evals.scoring import Answered, Score
from keel.pipeline import Completion, Context
from keel.request_errors import parse_request
from keel.types import ChatRequest
from keel.validation.answer import Expectations, problems
from keel.validation.repair import repair_request

if TYPE_CHECKING:
    from keel.engine import Keel

Ask = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
Scale = Literal["1-5", "pass_fail"]

JUDGE_FEATURE = "keel.judge"

DEFAULT_RUBRIC = (
    "You are an impartial judge of an AI assistant's answer. Judge its correctness against the reference "
    "answer when one is given, whether it meets the criteria when they are given, and otherwise its "
    "helpfulness, accuracy and relevance to the question. Do not let the answer's length or style sway "
    "you: a short correct answer beats a long one that is wrong or padded."
)
SCALES: dict[str, str] = {
    "1-5": ("Score it from 1 (wrong or useless) to 5 (fully correct and complete). Reply with JSON only: "
            '{"score": <integer 1 to 5>, "reason": "<one or two sentences>"}.'),
    "pass_fail": ("Give the verdict \"pass\" if it meets the bar and \"fail\" if not. Reply with JSON only: "
                  '{"verdict": "pass" or "fail", "reason": "<one or two sentences>"}.'),
}
# The score as an enum rather than minimum/maximum: every structured-output dialect supports enums.
SCHEMAS: dict[str, dict[str, Any]] = {
    "1-5": {"type": "object", "additionalProperties": False, "required": ["score", "reason"],
            "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}, "reason": {"type": "string"}}},
    "pass_fail": {"type": "object", "additionalProperties": False, "required": ["verdict", "reason"],
                  "properties": {"verdict": {"type": "string", "enum": ["pass", "fail"]},
                                 "reason": {"type": "string"}}},
}


def judge_ask(keel: Keel, feature: str = JUDGE_FEATURE) -> Ask:
    """An Ask that sends each judge request through `keel`'s pipeline under `feature`, settled (logged,
    priced, budget released) before it returns, as `Keel.handle` does for any library call. It is an
    internal call: budgets, limits and retries apply, guardrails and caches do not (the judged text is
    not the caller's input, and a cached verdict would hide a judge's run-to-run instability)."""

    async def ask(params: dict[str, Any]) -> dict[str, Any]:
        request = parse_request(ChatRequest, {**params, "stream": False}, strict=False)
        reply = await keel.handle(request, Context(feature=feature, internal=True))
        assert isinstance(reply, Completion)  # stream is False
        return reply.body

    return ask


@dataclass(frozen=True, slots=True)
class Asked:
    """A judge's validated JSON answer (None when it stayed invalid), what was wrong, and the judge's
    own model name as the upstream reported it."""

    value: dict[str, Any] | None
    problems: list[str]
    asks: int
    model: str | None


async def ask_json(ask: Ask, params: dict[str, Any], schema: Mapping[str, Any], name: str) -> Asked:
    """Ask under `schema` (response_format json_schema, strict); an invalid answer goes back once with
    its problems (the validation stage's re-ask message); a second invalid answer is returned as such.
    Through a Keel whose validation stage is on, the stage re-asks first: its InvalidOutput (after its
    own tries) is an invalid answer too, not asked again."""
    request = parse_request(ChatRequest, {**params, "response_format": {
        "type": "json_schema", "json_schema": {"name": name, "schema": dict(schema), "strict": True}}}, strict=False)
    expect = Expectations(json_object=True, schema=Draft202012Validator(dict(schema)))
    found: list[str] = []
    body: dict[str, Any] = {}
    for attempt in (1, 2):
        if attempt == 2:
            request = repair_request(request, body["choices"][0], found, expect)
        try:
            body = await ask(request.model_dump(mode="json", by_alias=True, exclude_none=True))
        except InvalidOutput as exc:
            return Asked(None, [exc.message], attempt, None)
        found = problems(expect, body) or _refused(body)
        if not found:
            content = body["choices"][0]["message"]["content"]
            return Asked(orjson.loads(content), [], attempt, body.get("model"))
    return Asked(None, found, 2, body.get("model"))


def _refused(body: Mapping[str, Any]) -> list[str]:
    """A refusal passes the validation stage's check (a documented answer) but carries no verdict."""
    message = (body.get("choices") or [{}])[0].get("message") or {}
    if isinstance(message.get("content"), str):
        return []
    why = f"it refused: {message['refusal']}" if message.get("refusal") else "the answer has no content"
    return [f"$: the judge gave no JSON ({why})"]


def case_sections(case: Case) -> list[str]:
    """The question, reference and criteria a judge is shown, each in its own marked block."""
    sections = [f"[Question]\n{case.question}"]
    if case.references:
        shown = "\n".join(f"- {r}" if len(case.references) > 1 else str(r) for r in case.references)
        sections.append(f"[Reference answer{'s (any is right)' if len(case.references) > 1 else ''}]\n{shown}")
    if case.criteria:
        sections.append(f"[Criteria]\n{case.criteria}")
    return sections


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model names are the same model, ignoring case and a provider prefix ("openai/gpt-4o")."""
    if not a or not b:
        return False
    return a.casefold().rsplit("/", 1)[-1] == b.casefold().rsplit("/", 1)[-1]


@dataclass
class RubricJudge:
    """A Metric: the judge model's rubric score of each answer, normalised to 0..1 ((score - 1) / 4 on
    the 1-5 scale, 1 or 0 for pass/fail), the raw score and the judge's reason kept.

    `ask` may be bound later (`bind`), since a suite builds its metrics before its Keel exists."""

    judged: ClassVar[bool] = True  # its scores are a judge model's: the report shows its verbosity and trust

    model: str
    ask: Ask | None = None
    rubric: str = DEFAULT_RUBRIC
    scale: Scale = "1-5"
    pass_at: int = 4  # on the 1-5 scale, the lowest score that passes
    target_model: str | None = None  # the judged model's name in keel.yaml, for the self-preference check
    temperature: float = 0.0
    max_tokens: int = 256
    threshold: float | None = None
    key: str = ""
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.scale not in SCHEMAS:
            raise ValueError(f"scale {self.scale!r}: a judge scores on '1-5' or 'pass_fail'")
        if not 1 <= self.pass_at <= 5:
            raise ValueError(f"pass_at {self.pass_at}: a score from 1 to 5")
        self.key = self.key or f"judge:{self.scale}:{self.model}:{self.rubric_hash}"
        if same_model(self.model, self.target_model):
            self._warn(f"self-preference: the judge {self.model} is the model it judges; its scores may favour "
                       "its own answers. Judge with another model.")

    @property
    def rubric_hash(self) -> str:
        """The first 8 hex digits of the rubric's and scale's sha256: a changed rubric is a new metric."""
        return hashlib.sha256(f"{self.scale}\n{self.rubric}".encode()).hexdigest()[:8]

    def bind(self, ask: Ask) -> RubricJudge:
        self.ask = ask
        return self

    def messages(self, answered: Answered) -> list[dict[str, Any]]:
        shown = [*case_sections(answered.case), f"[The assistant's answer]\n{answered.output}"]
        return [{"role": "system", "content": f"{self.rubric}\n\n{SCALES[self.scale]}"},
                {"role": "user", "content": "\n\n".join(shown)}]

    async def score(self, answered: Answered) -> Score:
        if answered.output is None:
            return Score(None, None, f"the call failed: {answered.error or 'no answer'}")
        if self.ask is None:
            raise RuntimeError(f"the judge {self.key} has no ask: bind it with judge.bind(judge_ask(keel))")
        asked = await ask_json(self.ask, {"model": self.model, "messages": self.messages(answered),
                                          "temperature": self.temperature, "max_tokens": self.max_tokens},
                               SCHEMAS[self.scale], "judge_score" if self.scale == "1-5" else "judge_verdict")
        details: dict[str, Any] = {"judge_model": self.model, "rubric": self.rubric_hash, "asks": asked.asks}
        if same_model(asked.model, answered.model) or same_model(self.model, answered.model):
            self._warn(f"self-preference: the judge ({asked.model or self.model}) answered as the judged model "
                       f"({answered.model}); its scores may favour its own answers. Judge with another model.")
        if self.warnings:
            details["warnings"] = list(self.warnings)
        if asked.value is None:
            return Score(None, None, f"judge answer invalid: {'; '.join(asked.problems)}", details)
        reason = str(asked.value["reason"])
        if self.scale == "pass_fail":
            passed = asked.value["verdict"] == "pass"
            return Score(1.0 if passed else 0.0, passed, reason, {**details, "verdict": asked.value["verdict"]})
        raw = int(asked.value["score"])
        return Score((raw - 1) / 4, raw >= self.pass_at, reason, {**details, "raw_score": raw})

    def _warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)


def rubric_judge_from_spec(spec: suites.MetricSpec, suite: suites.Suite) -> RubricJudge:
    """A suite's `{type: judge, rubric: ..., scale: 1-5 | pass_fail, pass_at: 4}`, judged by its
    `judge.model`, unbound: the runner binds it to its Keel (`judge.bind(judge_ask(keel))`)."""
    assert suite.judge is not None
    settings = spec.settings()
    unknown = set(settings) - {"rubric", "scale", "pass_at", "temperature", "max_tokens"}
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))}; a judge takes rubric, scale, pass_at, "
                         "temperature, max_tokens")
    return RubricJudge(model=suite.judge.model, target_model=suite.target.model, threshold=spec.threshold,
                       **settings)


suites.judge_factory = rubric_judge_from_spec
