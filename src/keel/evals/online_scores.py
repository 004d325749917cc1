"""The online judge's scores, kept with the time of the call they judged, for the drift monitor's
"judge score" (keel.evals.drift).

They are online evaluation results, so they live with the other evaluation results: in `eval_results`,
one row per judged call, under one run per UTC day (`online_20261205`, suite `keel.online`, status
`online`; `keel eval runs --suite keel.online` lists them). A row's `case_id` and `request_id` are the
judged call's request id, `created_at` the time the call started (the drift windows are windows of calls),
`answer` the judged model and deployment, and `scores` the verdict under `online`. No content is copied:
the call's input and output stay in the request log, under its content policy.

Blocking SQLAlchemy Core; the review feed's writer thread stores the scores, drift reads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select

from keel.evals.tables import eval_results, eval_runs
from keel.observability.store import RecordRejected, RecordStore

ONLINE_SUITE = "keel.online"
ONLINE_JUDGE = "online"  # the name a verdict of the online judge is kept under (a review item's `judge` too)
MAX_DAYS = 400  # a window longer than this is read from its last MAX_DAYS days


@dataclass(frozen=True, slots=True)
class OnlineScore:
    request_id: str
    at: float  # when the judged call started (unix seconds)
    model: str | None
    deployment: str | None
    verdict: Mapping[str, Any]  # Score.as_dict() shape: value, passed, reason, details

    @property
    def value(self) -> float | None:
        value = self.verdict.get("value")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def run_id(at: float) -> str:
    """The online run of the UTC day of `at`."""
    return "online_" + datetime.fromtimestamp(at, UTC).strftime("%Y%m%d")


def _day_start(day: str) -> float:
    return datetime.strptime(day.removeprefix("online_"), "%Y%m%d").replace(tzinfo=UTC).timestamp()


def run_ids(since: float, until: float) -> list[str]:
    """The online runs that may hold calls started in [since, until)."""
    first = datetime.fromtimestamp(max(since, until - MAX_DAYS * 86400), UTC).date()
    last = datetime.fromtimestamp(until, UTC).date()
    return [f"online_{(first + timedelta(days=n)).strftime('%Y%m%d')}" for n in range((last - first).days + 1)]


class OnlineScores:
    def __init__(self, store: RecordStore) -> None:
        self.store = store

    def save(self, scores: Sequence[OnlineScore]) -> int:
        """Store scores (a call already stored is skipped); how many were new."""
        if not scores:
            return 0
        days = sorted({run_id(s.at) for s in scores})
        self._runs(days)
        with self.store.transaction("store online judge scores in") as conn:
            present = {(row.run_id, row.case_id) for row in conn.execute(
                select(eval_results.c.run_id, eval_results.c.case_id).where(
                    eval_results.c.run_id.in_(days),
                    eval_results.c.case_id.in_([s.request_id for s in scores])))}
            rows, seen = [], set(present)
            for s in scores:
                key = (run_id(s.at), s.request_id)
                if key in seen:
                    continue
                seen.add(key)
                rows.append({"run_id": key[0], "case_id": s.request_id, "case_hash": f"online:{s.request_id}",
                             "created_at": s.at, "request_id": s.request_id, "output": None,
                             "answer": {"model": s.model, "deployment": s.deployment},
                             "scores": {ONLINE_JUDGE: dict(s.verdict)}})
            if rows:
                conn.execute(insert(eval_results), rows)
        return len(rows)

    def _runs(self, days: Sequence[str]) -> None:
        """The day runs, made when missing (two replicas making one at once: the loser's insert is refused)."""
        with self.store.connection() as conn:
            present = set(conn.execute(select(eval_runs.c.id).where(eval_runs.c.id.in_(days))).scalars())
        for day in days:
            if day in present:
                continue
            try:
                with self.store.transaction("start an online evaluation run in") as conn:
                    conn.execute(insert(eval_runs).values(
                        id=day, suite=ONLINE_SUITE, dataset="(live calls)", dataset_version="-", target={},
                        started_at=_day_start(day), status="online", config=None))
            except RecordRejected:  # made meanwhile by another replica
                pass

    def load(self, since: float, until: float, model: str | None = None) -> list[OnlineScore]:
        """The scores of calls started in [since, until) (of `model`, when given), oldest first."""
        query = (select(eval_results.c.case_id, eval_results.c.created_at, eval_results.c.answer,
                        eval_results.c.scores)
                 .where(eval_results.c.run_id.in_(run_ids(since, until)), eval_results.c.created_at >= since,
                        eval_results.c.created_at < until)
                 .order_by(eval_results.c.created_at))
        found = []
        with self.store.connection() as conn:
            for row in conn.execute(query):
                answer, verdict = row.answer or {}, (row.scores or {}).get(ONLINE_JUDGE)
                if not isinstance(verdict, dict) or (model is not None and answer.get("model") != model):
                    continue
                found.append(OnlineScore(row.case_id, row.created_at, answer.get("model"), answer.get("deployment"),
                                         verdict))
        return found
