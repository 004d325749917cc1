"""Run eval suites as tests in a project's own CI: pytest collects every `eval_*.yaml` suite file, runs
it once through Keel (the config of `--keel-config`, else $KEEL_CONFIG or ./keel.yaml), and reports
one test per metric that has a threshold, failing with the cases that missed.

    pytest evals/                    # collects evals/eval_capitals.yaml
    pytest --keel-config keel.yaml   # the models, prompts and request log the suites use

Installed with Keel (the `pytest11` entry point); `-p no:keel_evals` turns it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keel.evals.runner import MetricSummary, RunOutcome


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("keel", "Keel eval suites")
    group.addoption("--keel-config", default=None, help="keel.yaml for eval_*.yaml suites (default: as `keel`)")
    group.addoption("--keel-eval-fresh", action="store_true", help="call every case again (no reused answers)")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix in (".yaml", ".yml") and file_path.name.startswith("eval_"):
        return SuiteFile.from_parent(parent, path=file_path)
    return None


class SuiteFile(pytest.File):
    """One suite: run once, when its first test runs; each thresholded metric is a test."""

    outcome: RunOutcome | None = None

    def collect(self) -> Iterator[pytest.Item]:
        from keel.evals.suite import SuiteInvalid, load_suite

        try:
            suite = load_suite(self.path)
        except SuiteInvalid as exc:
            raise self.CollectError(str(exc)) from None
        thresholded: list[tuple[int | None, str]] = [
            (i, spec.name or spec.type) for i, spec in enumerate(suite.metrics) if spec.threshold is not None]
        for index, name in thresholded or [(None, "run")]:  # no thresholds: one test that no call failed
            yield MetricItem.from_parent(self, name=name, index=index)

    def run(self) -> RunOutcome:
        if self.outcome is None:
            self.outcome = asyncio.run(self._run())
        return self.outcome

    async def _run(self) -> RunOutcome:
        from keel.config import find_config
        from keel.evals.results import EvalStore
        from keel.evals.runner import run_suite
        from keel.evals.suite import load_suite
        from keel.observability.store import RecordStore

        flag = self.config.getoption("--keel-config")
        cfg = find_config(flag).load(warn_unset_keys=False)
        store = RecordStore(cfg.store.url)
        try:
            await asyncio.to_thread(store.migrate)
            return await run_suite(cfg, load_suite(self.path), EvalStore(store),
                                   resume=not self.config.getoption("--keel-eval-fresh"))
        finally:
            store.close()


class EvalFailed(Exception):
    """A metric missed its threshold, or cases failed to answer."""


class MetricItem(pytest.Item):
    def __init__(self, *, index: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index  # the metric's place in the suite (and in the run's summaries); None: the run

    def runtest(self) -> None:
        assert isinstance(self.parent, SuiteFile)
        outcome = self.parent.run()
        if self.index is None:
            if outcome.errors:
                raise EvalFailed(f"{outcome.errors} of {len(outcome.results)} cases failed to answer: "
                                 + "; ".join(f"{r.case_id}: {r.error}" for r in outcome.results if r.error)[:2000])
            return
        summary = outcome.metrics[self.index]
        if summary.passed is False:
            raise EvalFailed(_missed(summary, outcome))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, EvalFailed):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))


def _missed(summary: MetricSummary, outcome: RunOutcome) -> str:
    sign = "<=" if summary.lower_is_better else ">="
    mean = "nothing scored" if summary.mean is None else f"{summary.mean:.3f}"
    failed = [(r.case_id, r.scores.get(summary.key, {}).get("reason")) for r in outcome.results
              if r.scores.get(summary.key, {}).get("passed") is False]
    lines = [f"{summary.key}: {mean}, needs {sign} {summary.threshold:g} ({summary.scored} cases scored)"]
    lines += [f"  {case}: {why}" for case, why in failed[:20]]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more")
    return "\n".join(lines)
