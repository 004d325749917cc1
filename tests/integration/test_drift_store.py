"""The drift monitor on a real request log: records written to SQLite and to the machine's PostgreSQL,
then read back by `build_drift` and by `keel drift`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import fresh_pg_database
from typer.testing import CliRunner

from keel.cli import app
from keel.evals.drift import build_drift, windows
from keel.observability.record import RequestRecord
from keel.observability.store import RecordStore

NOW = time.time()
HOUR, DAY = 3600.0, 86_400.0


def records(n: int, start: float, end: float, *, seed: int, tokens: float, upstream: str,
            model: str = "chat") -> list[RequestRecord]:
    rng = np.random.default_rng(seed)
    step = (end - start) / n
    return [
        RequestRecord(
            request_id=f"{seed}-{i}", started_at=start + i * step, ended_at=start + i * step + 0.1, model=model,
            deployment="sim", upstream_model=upstream, outcome="ok",
            completion_tokens=max(1, int(rng.normal(tokens, 3))), latency_ms=float(rng.normal(100, 10)),
            cost_usd=0.001, output={"role": "assistant", "content": f"answer {i % 7}"},
        )
        for i in range(n)
    ]


# The week before the last hour: steady; the last hour: longer answers from a new upstream model.
BASELINE = records(300, NOW - 6 * DAY, NOW - 2 * DAY, seed=1, tokens=20, upstream="gpt-a")
# Recent, within the last ten minutes of the module's import: `keel drift` reads "the last hour" from its own
# clock, which a long test session moves on by many minutes before these tests run.
WINDOW = records(100, NOW - 10 * 60, NOW - 60, seed=2, tokens=45, upstream="gpt-b")
OLD = records(50, NOW - 30 * DAY, NOW - 20 * DAY, seed=3, tokens=500, upstream="gpt-z")  # outside both windows
# A model that did not change.
STEADY = (records(300, NOW - 6 * DAY, NOW - 2 * DAY, seed=5, tokens=20, upstream="gpt-a", model="steady")
          + records(100, NOW - 10 * 60, NOW - 60, seed=4, tokens=20, upstream="gpt-a", model="steady"))


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    with fresh_pg_database("keel_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path}/log.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    store = RecordStore(url)
    store.migrate()
    store.write(BASELINE + WINDOW + OLD + STEADY)
    yield url
    if request.param == "postgres":
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM requests")
    store.close()


def test_the_monitor_reads_the_windows_from_the_log(url: str) -> None:
    store = RecordStore(url)
    try:
        window, baseline = windows(HOUR, 7 * DAY, NOW)
        report = build_drift(store, window=window, baseline=baseline)
    finally:
        store.close()
    rows = {(r.model, r.metric): r for r in report.rows}
    assert rows[("chat", "output tokens")].verdict == "drift"
    assert (rows[("chat", "output tokens")].baseline_n, rows[("chat", "output tokens")].window_n) == (300, 100)
    assert rows[("chat", "upstream_model")].verdict == "drift"
    assert rows[("chat", "upstream_model")].statistic == "new: gpt-b"  # gpt-z is older than the baseline
    assert rows[("steady", "output tokens")].verdict == "ok"
    assert rows[("steady", "upstream_model")].verdict == "ok"


def test_keel_drift_prints_json_and_exits_1_with_check(url: str, tmp_path: Path) -> None:
    config = tmp_path / "keel.yaml"
    config.write_text(f"models: [{{name: chat, deployments: [{{provider: simulated}}]}}]\nstore: {{url: '{url}'}}\n")
    runner = CliRunner()
    base = ["drift", "--config", str(config), "--since", "1h", "--baseline", "7d", "--no-embed"]
    result = runner.invoke(app, [*base, "--format", "json", "--check", "--model", "chat"])
    assert result.exit_code == 1, result.output
    parsed = json.loads(result.stdout)
    assert parsed["drift"] is True and {row["model"] for row in parsed["rows"]} == {"chat"}
    steady = runner.invoke(app, [*base, "--format", "markdown", "--check", "--model", "steady"])
    assert steady.exit_code == 0, steady.output
    assert "| steady | output tokens |" in steady.stdout


def test_keel_drift_alerts_each_onset_once(url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "keel.yaml"
    config.write_text(f"models: [{{name: chat, deployments: [{{provider: simulated}}]}}]\nstore: {{url: '{url}'}}\n")
    command = ["drift", "--config", str(config), "--no-embed", "--alert", "--state", str(tmp_path / "state.json"),
               "--model", "chat", "--format", "json"]
    CliRunner().invoke(app, command)
    first = caplog.text.count("drift alert:")
    CliRunner().invoke(app, command)
    assert first >= 2 and caplog.text.count("drift alert:") == first  # the second run: nothing new


def test_a_bad_window_is_refused() -> None:
    result = CliRunner().invoke(app, ["drift", "--baseline", "soon"])
    assert result.exit_code == 2 and "--baseline must be" in result.stderr
