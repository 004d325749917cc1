"""The demo's eval run: a small suite whose every case is a call through the gateway, tagged with the
feature `eval:keel-demo` there as `keel eval run` tags its own calls; the run and its scores are stored in
the request-log database the gateway's config names, where the dashboard's Quality page reads them.

The runner calls the gateway through a Keel of its own (an `openai` deployment on the gateway's /v1, with
the demo's key and the feature header). That Keel's own request log is a throwaway file: the gateway
logs each call once."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson

from keel.config import KeelConfig
from keel.demo.steps import StepResult, Traffic
from keel.evals.results import CaseResult, EvalStore
from keel.evals.runner import RunOutcome, run_suite
from keel.evals.suite import Suite
from keel.observability.store import RecordStore, StoreError

SUITE = "keel-demo"
FEATURE = f"eval:{SUITE}"  # the runner's own tag for its calls
# Questions whose reference is in the question: an echoing simulated model passes them, and so does a model
# that answers; the last one's reference is not, so the run shows a failing case as real runs do.
CASES: tuple[dict[str, Any], ...] = (
    {"id": "capital", "input": "What is the capital of France? Answer with the city: Paris.", "reference": "Paris"},
    {"id": "translate", "input": "Translate 'thank you' into French: merci.", "reference": "merci"},
    {"id": "reverse", "input": "Spell 'keel' backwards: leek.", "reference": "leek"},
    {"id": "sum", "input": "What is 2 + 2? Reply with the number 4.", "reference": "4"},
    {"id": "planet", "input": "Which planet is called the red planet? Mars.", "reference": "Mars"},
    {"id": "unstated", "input": "What is the capital of Australia?", "reference": "Canberra"},
)


async def eval_run(t: Traffic, base_url: str, key: str | None, results_url: str | None) -> StepResult:
    """Run the suite through the gateway at `base_url`; store it in `results_url` (a request-log URL)."""
    store, where = _results(results_url)
    try:
        with tempfile.TemporaryDirectory(prefix="keel-demo-") as tmp:
            suite = _suite(Path(tmp), t.model)
            config = _runner_config(Path(tmp), base_url, t.model, key)

            def done(result: CaseResult, spent: float) -> None:
                t.tick()

            outcome = await run_suite(config, suite, store, resume=False, on_case=done)
    finally:
        if store is not None:
            store.store.close()
    return _result(outcome, where)


def _result(outcome: RunOutcome, where: str) -> StepResult:
    cases = len(outcome.results)
    if outcome.errors == cases:
        first = next(r.error for r in outcome.results if r.error)
        return StepResult("eval", cases, "failed", "every case failed", f"{first}")
    scores = ", ".join(f"{m.key} {m.mean:.0%}" for m in outcome.metrics if m.mean is not None and m.key == "contains")
    stored = f"run {outcome.run_id} stored in {where}" if outcome.run_id else f"not stored: {where}"
    verdict = "passed" if outcome.passed else "failed its thresholds"
    errors = f", {outcome.errors} errors" if outcome.errors else ""
    return StepResult("eval", cases, "ok", f"{cases} cases, {verdict}",
                      f"suite {SUITE} (feature {FEATURE}): {scores}{errors}; {stored}")


def _results(url: str | None) -> tuple[EvalStore | None, str]:
    """Where the run is stored, and how to name it; a store that cannot be opened only loses the record."""
    if url is None:
        return None, "no request log was named (--config)"
    try:
        return EvalStore(RecordStore(url)), _safe(url)
    except StoreError as exc:
        return None, f"{_safe(url)} could not be opened ({exc})"


def _safe(url: str) -> str:
    from keel.probes import safe_url

    return safe_url(url)


def _suite(tmp: Path, model: str) -> Suite:
    dataset = tmp / "keel-demo.jsonl"
    dataset.write_bytes(b"".join(orjson.dumps(case) + b"\n" for case in CASES))
    suite = Suite.model_validate({
        "name": SUITE, "dataset": dataset.name, "target": {"model": model},
        "params": {"temperature": 0, "max_tokens": 48}, "concurrency": 4,
        "metrics": [{"type": "contains", "threshold": 0.8}, {"type": "latency", "max_ms": 2000}],
    })
    suite.path = tmp / "eval_keel_demo.yaml"
    return suite


def _runner_config(tmp: Path, base_url: str, model: str, key: str | None) -> KeelConfig:
    """A Keel whose one model is the gateway's `model` under the same name, called once per case (no retries:
    the gateway retries), with the feature header so the gateway logs the call under the eval's feature."""
    headers = {"x-keel-feature": FEATURE}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return KeelConfig.model_validate({
        "models": [{"name": model, "retry": {"max_attempts": 1}, "deployments": [{
            "provider": "openai", "name": "gateway", "base_url": f"{base_url}/v1", "model": model,
            "headers": headers, "price": {"input": 0, "output": 0},  # the gateway counts the cost
        }]}],
        "store": {"url": f"sqlite:///{tmp / 'runner-calls.db'}", "spool_path": str(tmp / "runner-spool.jsonl"),
                  "log_content": False},
    })
