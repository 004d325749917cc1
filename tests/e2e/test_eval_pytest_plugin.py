"""The pytest plugin as a user's CI meets it: eval_*.yaml suites collected as tests, one per thresholded
metric, failing with the cases that missed; a bad suite is a collection error naming the file."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import yaml

pytest_plugins = ["pytester"]


def project(root: Path, threshold: float) -> None:
    (root / "keel.yaml").write_text(yaml.safe_dump({
        "models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
        "store": {"url": f"sqlite:///{root}/log.db", "spool_path": str(root / "spool.jsonl")}}))
    rows = [{"id": w.lower(), "input": w, "reference": f"echo: {w}"} for w in ("Paris", "Rome", "Lima")]
    rows.append({"id": "wrong", "input": "Bern", "reference": "echo: Zurich"})
    (root / "cases.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    (root / "eval_capitals.yaml").write_text(yaml.safe_dump({
        "dataset": "cases.jsonl", "target": {"model": "sim"},
        "metrics": [{"type": "exact_match", "threshold": threshold},
                    {"type": "regex", "pattern": "^echo", "threshold": 1.0}, {"type": "latency"}]}))


def test_each_thresholded_metric_is_a_test_and_a_miss_names_its_cases(pytester: pytest.Pytester) -> None:
    project(pytester.path, threshold=0.9)
    result = pytester.runpytest_subprocess("--keel-config", str(pytester.path / "keel.yaml"), "-v")
    result.assert_outcomes(passed=1, failed=1)  # regex passes; exact_match (0.75 < 0.9) fails; latency: no test
    result.stdout.fnmatch_lines(["*eval_capitals.yaml::exact_match FAILED*", "*eval_capitals.yaml::regex PASSED*",
                                 "*exact_match: 0.750, needs >= 0.9 (4 cases scored)*",
                                 "*wrong: expected 'echo: Zurich', got 'echo: Bern'*"])


def test_a_suite_that_meets_its_thresholds_passes(pytester: pytest.Pytester) -> None:
    project(pytester.path, threshold=0.7)
    pytester.runpytest_subprocess("--keel-config", str(pytester.path / "keel.yaml")).assert_outcomes(passed=2)


def test_a_bad_suite_is_a_collection_error_naming_the_file(pytester: pytest.Pytester) -> None:
    (pytester.path / "eval_broken.yaml").write_text("dataset: x.jsonl\nmetrics: []\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*eval_broken.yaml is invalid*"])
