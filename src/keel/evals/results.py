"""Eval runs and their per-case results in the request-log database (tables `eval_runs`, `eval_results`,
revision 0007). Blocking SQLAlchemy Core: the runner reaches it with asyncio.to_thread.

A result is keyed by its run and case, and carries the case's hash (the case and what it was sent
to): a later run of the same suite reuses the answers of earlier ones with the same hash, so a run
that was stopped resumes where it was, and an unchanged case is not paid for twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, update

from keel.evals.tables import eval_results, eval_runs
from keel.ids import random_hex
from keel.observability.store import RecordStore


@dataclass(slots=True)
class CaseResult:
    case_id: str
    case_hash: str
    output: str | None
    answer: dict[str, Any] | None = None
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric key -> Score.as_dict()
    latency_ms: float | None = None
    cost_usd: float | None = None
    error: str | None = None
    request_id: str | None = None
    reused: bool = False  # answered by an earlier run (same case hash): nothing was spent this time

    def row(self, run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "case_id": self.case_id, "case_hash": self.case_hash, "created_at": time.time(),
                "request_id": self.request_id, "output": self.output, "answer": self.answer, "scores": self.scores,
                "latency_ms": self.latency_ms, "cost_usd": self.cost_usd, "error": self.error}

    @classmethod
    def of(cls, row: Any) -> CaseResult:
        return cls(row.case_id, row.case_hash, row.output, row.answer, row.scores or {}, row.latency_ms,
                   row.cost_usd, row.error, row.request_id)


@dataclass(slots=True)
class RunRecord:
    id: str
    suite: str
    dataset: str
    dataset_version: str
    target: dict[str, Any]
    started_at: float
    ended_at: float | None
    status: str
    config: dict[str, Any] | None
    summary: dict[str, Any] | None


class RunNotFound(Exception):
    """No eval run has this id; the message lists recent ones."""


class EvalStore:
    def __init__(self, store: RecordStore) -> None:
        self.store = store

    def start(self, suite: str, dataset: str, dataset_version: str, target: dict[str, Any],
              config: dict[str, Any]) -> str:
        run_id = "run_" + random_hex(8)
        with self.store.transaction("start an eval run in") as conn:
            conn.execute(insert(eval_runs).values(
                id=run_id, suite=suite, dataset=dataset, dataset_version=dataset_version, target=target,
                started_at=time.time(), status="running", config=config))
        return run_id

    def save(self, run_id: str, result: CaseResult) -> None:
        with self.store.transaction("save an eval result in") as conn:
            conn.execute(delete(eval_results).where(eval_results.c.run_id == run_id,
                                                    eval_results.c.case_id == result.case_id))
            conn.execute(insert(eval_results).values(**result.row(run_id)))

    def finish(self, run_id: str, summary: dict[str, Any], status: str = "finished") -> None:
        with self.store.transaction("finish an eval run in") as conn:
            conn.execute(update(eval_runs).where(eval_runs.c.id == run_id).values(
                ended_at=time.time(), status=status, summary=summary))

    def cached(self, case_hashes: list[str]) -> dict[str, CaseResult]:
        """The latest answered result of each hash, from any run (failed calls are not reused)."""
        found: dict[str, CaseResult] = {}
        with self.store.connection() as conn:
            for start in range(0, len(case_hashes), 500):
                rows = conn.execute(
                    select(eval_results).where(eval_results.c.case_hash.in_(case_hashes[start:start + 500]),
                                               eval_results.c.error.is_(None))
                    .order_by(eval_results.c.created_at)
                )
                for row in rows:
                    found[row.case_hash] = CaseResult.of(row)
        return found

    def run(self, run_id: str) -> RunRecord:
        with self.store.connection() as conn:
            row = conn.execute(select(eval_runs).where(eval_runs.c.id == run_id)).first()
        if row is None:
            recent = ", ".join(r.id for r in self.runs(limit=5)) or "none yet"
            raise RunNotFound(f"there is no eval run {run_id!r}; recent runs: {recent} (`keel eval runs` lists them)")
        return RunRecord(**row._asdict())

    def runs(self, suite: str | None = None, limit: int = 20) -> list[RunRecord]:
        query = select(eval_runs).order_by(eval_runs.c.started_at.desc()).limit(limit)
        if suite is not None:
            query = query.where(eval_runs.c.suite == suite)
        with self.store.connection() as conn:
            return [RunRecord(**row._asdict()) for row in conn.execute(query)]

    def previous(self, suite: str, before: str) -> RunRecord | None:
        """The last finished run of `suite` other than `before`: the default baseline."""
        return next((r for r in self.runs(suite, limit=50) if r.id != before and r.status == "finished"), None)

    def results(self, run_id: str) -> list[CaseResult]:
        with self.store.connection() as conn:
            rows = conn.execute(select(eval_results).where(eval_results.c.run_id == run_id)
                                .order_by(eval_results.c.case_id))
            return [CaseResult.of(row) for row in rows]
