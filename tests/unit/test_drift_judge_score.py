"""The online judge's score as a drift metric: it fires on a shifted window and not on an unshifted one
(fixed seeds), for a graded and a pass/fail judge; the scores are stored by the review feed's writer with
the judged call's time and model, and read back by `build_drift` over the windows (SQLite and the
machine's PostgreSQL)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import fresh_pg_database

from keel.config import ReviewConfig, StoreConfig
from keel.evals.drift import Thresholds, build_drift, compare_calls
from keel.evals.online_scores import ONLINE_SUITE, OnlineScore, OnlineScores, run_id, run_ids
from keel.evals.results import EvalStore
from keel.evals.review import ReviewQueue
from keel.evals.review_feed import ReviewFeed
from keel.observability.record import RequestRecord
from keel.observability.store import RecordStore
from keel.observability.writer import ContentPolicy

WINDOW, BASELINE = (1000.0, 2000.0), (0.0, 1000.0)


def graded(n: int, seed: int, start: float, end: float, *, mean: float, model: str = "chat") -> list[OnlineScore]:
    """1-5 rubric scores around `mean`, normalised to 0..1 as RubricJudge gives them."""
    rng = np.random.default_rng(seed)
    raws = np.clip(np.rint(rng.normal(mean, 0.7, n)), 1, 5)
    step = (end - start) / n
    return [OnlineScore(f"{seed}-{i}", start + i * step, model, "sim",
                        {"value": float((raw - 1) / 4), "passed": bool(raw >= 4)}) for i, raw in enumerate(raws)]


def pass_fail(n: int, seed: int, start: float, end: float, *, rate: float) -> list[OnlineScore]:
    rng = np.random.default_rng(seed)
    step = (end - start) / n
    return [OnlineScore(f"{seed}-{i}", start + i * step, "chat", "sim", {"value": float(ok), "passed": bool(ok)})
            for i, ok in enumerate(rng.random(n) < rate)]


def judge_row(baseline: list[OnlineScore], window: list[OnlineScore]) -> tuple[str, object, object]:
    report = compare_calls([], [], window=WINDOW, baseline=BASELINE, thresholds=Thresholds(),
                           judged=(baseline, window))
    (row,) = [r for r in report.rows if r.metric == "judge score"]
    return row.verdict, row.window, row.baseline


def test_a_graded_judges_score_drifts_when_the_window_is_shifted_and_not_otherwise() -> None:
    baseline = graded(300, 1, *BASELINE, mean=4.3)
    assert judge_row(baseline, graded(100, 2, *WINDOW, mean=4.3))[0] == "ok"
    verdict, window, before = judge_row(baseline, graded(100, 3, *WINDOW, mean=3.0))
    assert verdict == "drift" and isinstance(window, float) and isinstance(before, float) and window < before


def test_a_pass_fail_judges_pass_rate_drifts_when_it_falls_and_not_otherwise() -> None:
    baseline = pass_fail(300, 4, *BASELINE, rate=0.9)
    assert judge_row(baseline, pass_fail(100, 5, *WINDOW, rate=0.9))[0] == "ok"
    verdict, window, before = judge_row(baseline, pass_fail(100, 6, *WINDOW, rate=0.6))
    assert verdict == "drift" and window == pytest.approx(0.6, abs=0.1)
    assert before == pytest.approx(0.9, abs=0.05)


def test_few_scores_are_not_enough_data_and_unscored_verdicts_are_left_out() -> None:
    few = graded(10, 7, *WINDOW, mean=1.0)
    unscored = [OnlineScore(f"u{i}", 1500.0, "chat", "sim", {"value": None, "reason": "judge answer invalid"})
                for i in range(200)]
    assert judge_row(graded(300, 1, *BASELINE, mean=4.3), few + unscored)[0] == "not enough data"


def test_the_day_runs_cover_a_window() -> None:
    assert run_id(0.0) == "online_19700101"
    assert run_ids(86_400 * 1.5, 86_400 * 3.2) == ["online_19700102", "online_19700103", "online_19700104"]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/log.db"
        return
    with fresh_pg_database("keel_online") as url:
        yield url


def test_the_review_feed_stores_online_scores_and_drift_reads_them_by_window(url: str) -> None:
    store = RecordStore(url)
    store.migrate()
    now = time.time()
    hour, day = 3600.0, 86_400.0
    feed = ReviewFeed(ReviewQueue(store), ReviewConfig(judge_sample_rate=1.0), ContentPolicy(StoreConfig()),
                      rng=random.Random(0))
    baseline = graded(200, 8, now - 6 * day, now - 2 * day, mean=4.4)
    window = graded(60, 9, now - 50 * 60, now - 60, mean=2.5)
    for score in baseline + window:
        record = RequestRecord(request_id=score.request_id, started_at=score.at, ended_at=score.at + 0.1,
                               model=score.model, deployment=score.deployment)
        feed._verdict_keeper(record, None)(score.verdict)  # what the online judge's worker calls with a verdict
    feed._verdict_keeper(RequestRecord(request_id=baseline[0].request_id, started_at=baseline[0].at,
                                       ended_at=baseline[0].at, model="chat"), None)({"value": 0.0})  # again: kept once
    assert feed.writer.flush() and feed.writer.dropped == 0
    feed.writer.close()
    stored = OnlineScores(store).load(now - 7 * day, now)
    assert len(stored) == 260 and stored[0].model == "chat" and stored[0].verdict == baseline[0].verdict
    assert OnlineScores(store).load(now - 7 * day, now, model="other") == []
    runs = EvalStore(store).runs(ONLINE_SUITE)
    assert runs and all(r.status == "online" for r in runs)
    report = build_drift(store, window=(now - hour, now), baseline=(now - 7 * day - hour, now - hour))
    (row,) = [r for r in report.rows if r.metric == "judge score"]
    assert row.verdict == "drift" and row.window_n == 60 and row.baseline_n == 200
    steady = build_drift(store, window=(now - 5 * day, now - 3 * day), baseline=(now - 7 * day, now - 5 * day))
    assert [r.verdict for r in steady.rows if r.metric == "judge score"] == ["ok"]
    store.close()
