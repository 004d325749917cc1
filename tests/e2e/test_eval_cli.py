"""`keel eval` as CI runs it: exit codes of the thresholds and the gate, reports written to files, a
comparison of two runs, and a run killed halfway that the next run resumes without paying again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml
from sqlalchemy import create_engine, text


def setup(tmp_path: Path, cases: int = 6, latency_ms: float = 0, threshold: float | None = 0.9,
          concurrency: int = 4) -> tuple[Path, Path, str]:
    url = f"sqlite:///{tmp_path}/log.db"
    config = tmp_path / "keel.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "sim", "deployments": [{"provider": "simulated", "latency_ms": latency_ms}]}],
        "store": {"url": url, "spool_path": str(tmp_path / "spool.jsonl")}}))
    rows = [{"id": f"c{i:03d}", "input": f"word{i}", "reference": f"echo: word{i}" if i else "echo: nope"}
            for i in range(cases)]
    (tmp_path / "cases.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    metric: dict[str, Any] = {"type": "exact_match"}
    if threshold is not None:
        metric["threshold"] = threshold
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "words", "dataset": "cases.jsonl", "target": {"model": "sim"},
                                     "metrics": [metric], "concurrency": concurrency}))
    return config, suite, url


def keel(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keel.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=180, env={**os.environ, "NO_COLOR": "1"})


def test_thresholds_and_the_gate_set_the_exit_code(tmp_path: Path) -> None:
    config, suite, _ = setup(tmp_path)
    failed = keel("eval", "run", str(suite), "--config", str(config), "--format", "json", "--no-progress", cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    first = json.loads(failed.stdout)
    assert first["passed"] is False and first["metrics"][0]["mean"] == 5 / 6 and first["cases"] == 6
    gated = keel("eval", "run", str(suite), "--config", str(config), "--format", "markdown", "--no-progress",
                 "--fail-under", "exact_match=0.8", "--max-regression", "exact_match=0.0", cwd=tmp_path)
    assert gated.returncode == 1  # the suite's own 0.9 still fails
    assert "| exact_match >= 0.8 | 0.833 | pass |" in gated.stdout
    assert "| exact_match regression <= 0 | 0.000 | pass |" in gated.stdout
    bad = keel("eval", "run", str(suite), "--config", str(config), "--fail-under", "bleu=1", cwd=tmp_path)
    assert bad.returncode == 2 and "bleu" in bad.stderr and "exact_match" in bad.stderr
    missing = keel("eval", "run", str(tmp_path / "nope.yaml"), "--config", str(config), cwd=tmp_path)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_a_passing_run_exits_0_writes_html_and_compares_with_the_last(tmp_path: Path) -> None:
    config, suite, _ = setup(tmp_path, threshold=0.8)
    page = tmp_path / "report.html"
    first = keel("eval", "run", str(suite), "--config", str(config), "--format", "html", "-o", str(page),
                 "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "<svg" in page.read_text() and "PASSED" in page.read_text()
    second = keel("eval", "run", str(suite), "--config", str(config), "--format", "json", "--no-progress",
                  cwd=tmp_path)
    assert second.returncode == 0
    body = json.loads(second.stdout)
    assert body["reused"] == 6 and body["cost_usd"] == 0 and body["baseline"] is not None
    runs = keel("eval", "runs", "--config", str(config), cwd=tmp_path)
    assert runs.returncode == 0 and body["run_id"] in runs.stdout and body["baseline"] in runs.stdout
    compared = keel("eval", "compare", body["baseline"], body["run_id"], "--config", str(config), "--json",
                    cwd=tmp_path)
    assert compared.returncode == 0
    delta = json.loads(compared.stdout)["metrics"][0]
    assert delta["key"] == "exact_match" and delta["delta"] == 0 and delta["regressed"] == []
    unknown = keel("eval", "compare", "run_nope", body["run_id"], "--config", str(config), cwd=tmp_path)
    assert unknown.returncode == 2 and "run_nope" in unknown.stderr


def test_a_run_killed_halfway_is_resumed_by_the_next_without_asking_again(tmp_path: Path) -> None:
    config, suite, url = setup(tmp_path, cases=40, latency_ms=150, threshold=None, concurrency=1)
    process = subprocess.Popen([sys.executable, "-m", "keel.cli", "eval", "run", str(suite), "--config", str(config),
                                "--no-progress"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = create_engine(url)
    try:
        deadline = time.monotonic() + 120
        stored = 0
        while stored < 5:  # wait until some cases are stored, then kill the run mid-way
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no results were stored in 120 s"
            try:
                with engine.connect() as conn:
                    stored = conn.execute(text("SELECT count(*) FROM eval_results")).scalar_one()
            except Exception:  # the schema is not there yet
                stored = 0
            time.sleep(0.05)  # polling the database for a condition, not waiting for time to pass
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        with engine.connect() as conn:
            kept = conn.execute(text("SELECT count(*) FROM eval_results")).scalar_one()
    finally:
        if process.poll() is None:
            process.kill()
        engine.dispose()
    assert 5 <= kept < 40
    resumed = keel("eval", "run", str(suite), "--config", str(config), "--format", "json", "--no-progress",
                   cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    body = json.loads(resumed.stdout)
    assert body["cases"] == 40 and body["reused"] == kept and body["errors"] == 0


def test_compare_with_a_judge_judges_both_orders_and_warns_of_self_preference(tmp_path: Path) -> None:
    config, suite, _ = setup(tmp_path, threshold=None)
    runs = []
    for _ in range(2):
        done = keel("eval", "run", str(suite), "--config", str(config), "--format", "json", "--no-progress",
                    "--fresh", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout)["run_id"])
    judged = keel("eval", "compare", *runs, "--config", str(config), "--judge", "sim", "--format", "json",
                  cwd=tmp_path)
    assert judged.returncode == 0, judged.stderr
    pairwise = json.loads(judged.stdout)["pairwise"]
    # The simulated judge answers the schema's first value, "A", whatever it is shown: in both orders that
    # is one win each, so every case is a tie and no verdict is position-consistent.
    assert pairwise["cases"] == 6 and pairwise["ties"] == 6 and pairwise["win_rate_b"] == 0.5
    assert pairwise["consistency"] == 0.0 and pairwise["length_controlled"]["win_rate_b"] is not None
    assert any("self-preference" in w for w in pairwise["warnings"])
    page = tmp_path / "compare.html"
    written = keel("eval", "compare", *runs, "--config", str(config), "--judge", "sim", "--format", "html", "-o",
                   str(page), cwd=tmp_path)
    assert written.returncode == 0 and "position consistency" in page.read_text()
    unknown = keel("eval", "compare", *runs, "--config", str(config), "--judge", "gpt-9", cwd=tmp_path)
    assert unknown.returncode == 2 and "gpt-9" in unknown.stderr and "sim" in unknown.stderr


def test_judge_runs_review_and_trust_from_the_command_line(tmp_path: Path) -> None:
    config, suite, _ = setup(tmp_path, threshold=None)
    spec = yaml.safe_load(suite.read_text())
    spec.update(judge={"model": "sim"}, metrics=[{"type": "judge", "scale": "pass_fail", "name": "verdict"}])
    suite.write_text(yaml.safe_dump(spec))
    done = keel("eval", "run", str(suite), "--config", str(config), "--format", "json", "--no-progress",
                "--judge-runs", "2", "--review", "all", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "6 case(s) sent to the review queue" in done.stderr
    (judge,) = json.loads(done.stdout)["judges"]
    assert judge["key"] == "verdict" and judge["stability"]["k"] == 2 and judge["stability"]["identical"] == 1.0
    listed = keel("eval", "review", "list", "--config", str(config), cwd=tmp_path)
    items = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    assert len(items) == 6
    for n, item in enumerate(items):  # the simulated judge passes everything; the reviewer fails two
        labelled = keel("eval", "review", "label", item["id"], "--reviewer", "ann", "--label",
                        "fail" if n < 2 else "pass", "--config", str(config), cwd=tmp_path)
        assert labelled.returncode == 0, labelled.stderr
    trusted = keel("eval", "trust", "--config", str(config), "--judge", "verdict", "--json", cwd=tmp_path)
    assert trusted.returncode == 0, trusted.stderr
    found = json.loads(trusted.stdout)["verdict"]
    assert found["n"] == 6 and found["accuracy"] == 4 / 6 and found["kappa"] == 0.0
    bad = keel("eval", "trust", "--config", str(config), "--source", "web", cwd=tmp_path)
    assert bad.returncode == 2 and "production" in bad.stderr
