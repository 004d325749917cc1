"""Run a suite: every case through Keel's pipeline (retries, limits, budgets and costs apply, and each
call is in the request log under the feature `eval:<suite>`), concurrently up to the suite's bound,
scored by its metrics, stored case by case so a stopped run resumes, and summed up.

The runner's own work per case (building the request, hashing, scoring the cheap metrics, storing)
is measured by bench/evals.py; the calls themselves are the target's time.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.config import KeelConfig, ModelConfig
from keel.engine import Keel
from keel.errors import KeelError
from keel.evals.dataset import Case, Dataset
from keel.evals.judge_report import RUNS, JudgeFigures, human_agreement, is_judge, judge_figures, run_label
from keel.evals.judges import judge_ask
from keel.evals.metrics import Embed
from keel.evals.results import CaseResult, EvalStore
from keel.evals.review import ReviewQueue
from keel.evals.scoring import Answered, Metric, Score
from keel.evals.suite import TARGET_MODEL, Suite
from keel.pipeline import Completion, Context
from keel.request_errors import parse_request
from keel.types import ChatRequest

Progress = Callable[[CaseResult, float], None]  # a finished case, and the run's spend so far (USD)


@dataclass
class MetricSummary:
    key: str
    scored: int  # cases the metric could score
    mean: float | None
    pass_rate: float | None  # over the scored cases that pass or fail
    threshold: float | None
    passed: bool | None  # the mean against the threshold; None without one
    lower_is_better: bool = False  # latency, cost: the threshold is a ceiling, a rise is a regression

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "scored": self.scored, "mean": self.mean, "pass_rate": self.pass_rate,
                "threshold": self.threshold, "passed": self.passed, "lower_is_better": self.lower_is_better}


@dataclass
class RunOutcome:
    run_id: str | None  # None when the run was not stored
    suite: Suite
    dataset: Dataset
    results: list[CaseResult]
    metrics: list[MetricSummary]
    cost_usd: float = 0.0  # spent by this run (reused answers cost nothing)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    judges: list[JudgeFigures] = field(default_factory=list)  # verbosity, stability, agreement with people

    @property
    def errors(self) -> int:
        return sum(result.error is not None for result in self.results)

    @property
    def passed(self) -> bool:
        return all(metric.passed is not False for metric in self.metrics)

    def summary(self) -> dict[str, Any]:
        latencies = sorted(r.latency_ms for r in self.results if r.latency_ms is not None and not r.reused)
        return {
            "cases": len(self.results), "errors": self.errors, "reused": sum(r.reused for r in self.results),
            "cost_usd": self.cost_usd, "seconds": self.seconds,
            "p50_ms": _quantile(latencies, 0.5), "p95_ms": _quantile(latencies, 0.95),
            "metrics": [m.as_dict() for m in self.metrics], "passed": self.passed, "warnings": self.warnings,
            "judges": [j.as_dict() for j in self.judges],
        }


class EvalRunner:
    """`judge_runs`: how many times each judge metric scores a case (k > 1 measures its stability); default:
    the suite's `judge.runs`."""

    def __init__(self, keel: Keel, suite: Suite, metrics: Sequence[Metric], store: EvalStore | None = None,
                 judge_runs: int | None = None) -> None:
        self.keel = keel
        self.suite = suite
        self.metrics = list(metrics)
        self.store = store
        self.judge_runs = judge_runs or (suite.judge.runs if suite.judge is not None else 1)
        if self.judge_runs < 1:
            raise ValueError(f"judge runs: {self.judge_runs}; a case is judged at least once")
        for metric in self.metrics:  # a suite's judges are built unbound: they ask through this Keel
            if is_judge(metric) and getattr(metric, "ask", None) is None:
                metric.bind(judge_ask(keel))  # type: ignore[attr-defined]

    async def run(self, *, concurrency: int | None = None, resume: bool = True, on_case: Progress | None = None,
                  dataset: Dataset | None = None) -> RunOutcome:
        dataset = dataset or self.suite.load_dataset()
        started = time.perf_counter()
        target = self.suite.target_digest()
        hashes = {case.id: _case_hash(case, target) for case in dataset.cases}
        cached = await asyncio.to_thread(self.store.cached, list(hashes.values())) if self.store and resume else {}
        run_id = None
        if self.store is not None:
            run_id = await asyncio.to_thread(
                self.store.start, self.suite.name, str(dataset.path), dataset.version,
                self.suite.target.model_dump(exclude_none=True), self.suite.model_dump(mode="json"))
        spent = 0.0
        bound = asyncio.Semaphore(concurrency or self.suite.concurrency)

        async def one(case: Case) -> CaseResult:
            nonlocal spent
            async with bound:
                result = await self._case(case, hashes[case.id], cached.get(hashes[case.id]))
            if not result.reused:
                spent += result.cost_usd or 0.0
            if self.store is not None and run_id is not None:
                await asyncio.to_thread(self.store.save, run_id, result)
            if on_case is not None:
                on_case(result, spent)
            return result

        status = "interrupted"
        try:
            results = list(await asyncio.gather(*(one(case) for case in dataset.cases)))
            status = "finished"
        finally:
            if status != "finished" and self.store is not None and run_id is not None:
                await asyncio.to_thread(self.store.finish, run_id, {"cost_usd": spent}, status)
        outcome = RunOutcome(run_id, self.suite, dataset, results, summarise(self.metrics, results), spent,
                             time.perf_counter() - started, self._warnings())
        humans = {}
        if self.store is not None:
            keys = [m.key for m in self.metrics if is_judge(m)]
            humans = await asyncio.to_thread(human_agreement, ReviewQueue(self.store.store), keys)
        outcome.judges = judge_figures(self.metrics, results, humans)
        if self.store is not None and run_id is not None:
            await asyncio.to_thread(self.store.finish, run_id, outcome.summary())
        return outcome

    async def _case(self, case: Case, case_hash: str, earlier: CaseResult | None) -> CaseResult:
        if earlier is not None:
            kept = {m.key: earlier.scores[m.key] for m in self.metrics if m.key in earlier.scores}
            result = CaseResult(case.id, case_hash, earlier.output, earlier.answer, kept,
                                earlier.latency_ms, earlier.cost_usd, None, earlier.request_id, reused=True)
        else:
            result = await self._call(case, case_hash)
        answered = Answered(case, result.output, result.answer, result.latency_ms or 0.0, result.cost_usd or 0.0,
                            result.error, (result.answer or {}).get("model"))
        for metric in self.metrics:
            if self._scores_again(metric, result.scores.get(metric.key)):
                result.scores[metric.key] = (await self._score(metric, answered)).as_dict()
        return result

    def _scores_again(self, metric: Metric, stored: dict[str, Any] | None) -> bool:
        """A reused answer keeps the scores its metrics already gave, unless a judge must now run more times."""
        if stored is None:
            return True
        return is_judge(metric) and self.judge_runs > 1 and len((stored.get("details") or {}).get(RUNS) or ()) < (
            self.judge_runs)

    async def _score(self, metric: Metric, answered: Answered) -> Score:
        if not is_judge(metric) or self.judge_runs == 1:
            return await _scored(metric, answered)
        scores = await asyncio.gather(*(_scored(metric, answered) for _ in range(self.judge_runs)))
        first = scores[0]
        first.details = {**first.details, RUNS: [run_label(s) for s in scores]}
        return first

    async def _call(self, case: Case, case_hash: str) -> CaseResult:
        target = self.suite.target
        params: dict[str, Any] = {**self.suite.params, "messages": [dict(m) for m in case.messages]}
        if target.base_url is not None:
            params["model"] = TARGET_MODEL
        elif target.model is not None:
            params["model"] = target.model
        ctx = Context(feature=f"eval:{self.suite.name}")
        started = time.perf_counter()
        try:
            if target.prompt is not None:
                params.update(prompt=target.prompt, prompt_version=target.version, variables=case.variables or {})
                ctx.prompt = self.keel.render_prompt(params)
            reply = await self.keel.handle(parse_request(ChatRequest, params, strict=False), ctx)
            assert isinstance(reply, Completion)  # eval requests are never streamed
        except KeelError as exc:
            return CaseResult(case.id, case_hash, None, error=f"{exc.code or exc.type}: {exc.message}",
                              latency_ms=(time.perf_counter() - started) * 1000, cost_usd=ctx.cost.usd,
                              request_id=ctx.request_id)
        return CaseResult(case.id, case_hash, answer_text(reply.body), reply.body,
                          latency_ms=(time.perf_counter() - started) * 1000, cost_usd=ctx.cost.usd,
                          request_id=ctx.request_id)

    def _warnings(self) -> list[str]:
        found = []
        for metric in self.metrics:
            found += [w for w in getattr(metric, "warnings", ()) if w not in found]
        return found


async def run_suite(config: KeelConfig, suite: Suite, store: EvalStore | None, *, dataset: Dataset | None = None,
                    concurrency: int | None = None, resume: bool = True, on_case: Progress | None = None,
                    judge_runs: int | None = None) -> RunOutcome:
    """Run `suite` on a Keel made from `config` (with the suite's base_url target added), closed after."""
    from keel.evals.suite import build_metrics

    async with Keel(config_for(config, suite)) as keel:
        embed = embedder_of(keel) if any(spec.type == "semantic" for spec in suite.metrics) else None
        runner = EvalRunner(keel, suite, build_metrics(suite, embed), store, judge_runs)
        return await runner.run(concurrency=concurrency, resume=resume, on_case=on_case, dataset=dataset)


def embedder_of(keel: Keel) -> Embed:
    """The semantic metric's embed function: the Keel's shared local embedder."""
    shared = keel.shared_embedder()

    async def embed(texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = (await shared.embed(texts)).array.tolist()
        return vectors

    return embed


def answer_text(body: dict[str, Any]) -> str:
    """The answer's text; tool calls as their JSON arguments when there is no text."""
    message = (body.get("choices") or [{}])[0].get("message") or {}
    if message.get("content"):
        return str(message["content"])
    calls = message.get("tool_calls") or []
    return "\n".join(str(call.get("function", {}).get("arguments", "")) for call in calls)


async def _scored(metric: Metric, answered: Answered) -> Score:
    try:
        return await metric.score(answered)
    except KeelError as exc:  # a judge's own call failed: this case is unscored by it, not failed
        return Score(None, None, f"the metric could not score: {exc.code or exc.type}: {exc.message}")


def summarise(metrics: Sequence[Metric], results: Sequence[CaseResult]) -> list[MetricSummary]:
    summaries = []
    for metric in metrics:
        scores = [Score.of(r.scores[metric.key]) for r in results if metric.key in r.scores]
        values = [s.value for s in scores if s.value is not None]
        verdicts = [s.passed for s in scores if s.passed is not None]
        mean = sum(values) / len(values) if values else None
        passed = None
        if metric.threshold is not None:
            if mean is None:
                passed = False  # nothing scored: the threshold is not met
            elif lower_is_better(metric):
                passed = mean <= metric.threshold
            else:
                passed = mean >= metric.threshold
        summaries.append(MetricSummary(metric.key, len(values), mean,
                                       sum(verdicts) / len(verdicts) if verdicts else None, metric.threshold, passed,
                                       lower_is_better(metric)))
    return summaries


def lower_is_better(metric: Metric) -> bool:
    """Latency and cost: a threshold on them is a ceiling, a regression is a rise."""
    return bool(getattr(metric, "lower_is_better", False))


def config_for(config: KeelConfig, suite: Suite) -> KeelConfig:
    """`config` with the suite's base_url target added as the model `eval-target` (an `openai` deployment),
    so even a server outside keel.yaml is called through the pipeline."""
    target = suite.target
    if target.base_url is None:
        return config
    deployment: dict[str, Any] = {"provider": "openai", "base_url": target.base_url, "model": target.model}
    if target.api_key_env:
        deployment["api_key_env"] = target.api_key_env
    model = ModelConfig.model_validate({"name": TARGET_MODEL, "deployments": [deployment]})
    return config.model_copy(update={"models": [*config.models, model]})


def _case_hash(case: Case, target: str) -> str:
    return hashlib.sha256(f"{case.digest}\0{target}".encode()).hexdigest()


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    index = q * (len(values) - 1)
    low = int(index)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (index - low)
