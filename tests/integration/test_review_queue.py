"""The review queue on SQLite and PostgreSQL: items added, listed pending first with filters and pages,
labelled by several reviewers (who and when kept), tenant-scoped, exported as (judge, human) pairs; a
call of the request log added as an item, refused when its content was not logged; eval results sent."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fresh_pg_database

from keel.evals.dataset import Case
from keel.evals.results import CaseResult
from keel.evals.review import BadLabel, CallNotFound, ContentNotLogged, ItemNotFound, ReviewQueue, new_item
from keel.evals.review_feed import enqueue_eval_results
from keel.observability.record import RequestRecord
from keel.observability.store import RecordStore

MESSAGES = [{"role": "user", "content": "Capital of France?"}]
ANSWER = {"role": "assistant", "content": "Paris"}


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    with fresh_pg_database("keel_review") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RecordStore]:
    url = f"sqlite:///{tmp_path}/log.db" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    opened = RecordStore(url)
    yield opened
    if request.param == "postgres":  # the module's database is shared: empty the tables after each test
        from sqlalchemy import delete

        from keel.evals.tables import review_items, review_labels
        from keel.observability.store import requests

        with opened.transaction("clean") as conn:
            for table in (review_labels, review_items, requests):
                conn.execute(delete(table))
    opened.close()


@pytest.fixture
def queue(store: RecordStore) -> ReviewQueue:
    ticks = itertools.count(1000)
    return ReviewQueue(store, clock=lambda: float(next(ticks)))


def test_an_item_is_pending_until_its_first_label_and_keeps_every_reviewer_with_when(queue: ReviewQueue) -> None:
    item, created = queue.add(new_item("production", ref="req_1", tenant="a", input=MESSAGES, output=ANSWER))
    assert created and queue.get(item.id).status == "pending"
    once = queue.label(item.id, "alice", label="pass", comment="right")
    assert once.status == "labelled"
    twice = queue.label(item.id, "bob", label="fail", score=2)
    assert [(lbl.reviewer, lbl.label, lbl.score, lbl.comment) for lbl in twice.labels] == [
        ("alice", "pass", None, "right"), ("bob", "fail", 2.0, None)]
    assert twice.labels[0].created_at < twice.labels[1].created_at
    assert twice.input == MESSAGES and twice.output == ANSWER


def test_the_same_source_and_ref_is_one_item(queue: ReviewQueue) -> None:
    first, created = queue.add(new_item("production", ref="req_1", input=MESSAGES))
    again, created_again = queue.add(new_item("production", ref="req_1", input=[{"role": "user", "content": "x"}]))
    assert created and not created_again and again.id == first.id and again.input == MESSAGES
    assert queue.add_many([new_item("production", ref="req_1"), new_item("production", ref="req_2")]) == 1


def test_the_list_puts_pending_first_filters_and_pages(queue: ReviewQueue) -> None:
    ids = [queue.add(new_item(source, ref=f"r{i}", created_at=float(i), input=MESSAGES))[0].id
           for i, source in enumerate(["production", "semantic_cache", "production", "eval", "production"])]
    queue.label(ids[0], "alice", label="pass")
    page = queue.list_items(limit=2)
    assert [item.id for item in page.items] == ids[1:3] and page.total == 5 and page.has_more
    rest = queue.list_items(limit=10, offset=2)
    assert [item.id for item in rest.items] == [ids[3], ids[4], ids[0]] and not rest.has_more
    assert [i.id for i in queue.list_items(status="labelled").items] == [ids[0]]
    assert [i.id for i in queue.list_items(source="production", status="pending").items] == [ids[2], ids[4]]


def test_a_tenant_sees_and_labels_only_its_own_items(queue: ReviewQueue) -> None:
    mine, _ = queue.add(new_item("production", ref="a1", tenant="a", input=MESSAGES))
    theirs, _ = queue.add(new_item("production", ref="b1", tenant="b", input=MESSAGES))
    assert [i.id for i in queue.list_items(tenant="a").items] == [mine.id]
    with pytest.raises(ItemNotFound):
        queue.get(theirs.id, tenant="a")
    with pytest.raises(ItemNotFound):
        queue.label(theirs.id, "alice", label="pass", tenant="a")
    assert queue.get(theirs.id).labels == []  # nothing was written
    assert queue.list_items().total == 2  # the master key sees both


@pytest.mark.parametrize(("label", "score"), [(None, None), ("maybe", None), (None, float("nan")), ("pass", True)])
def test_a_label_without_a_verdict_or_score_or_out_of_range_is_refused(
    queue: ReviewQueue, label: str | None, score: float | None,
) -> None:
    item, _ = queue.add(new_item("production", ref="r", input=MESSAGES))
    with pytest.raises(BadLabel):
        queue.label(item.id, "alice", label=label, score=score)
    assert queue.get(item.id).status == "pending"


def test_labelled_pairs_pair_each_verdict_with_each_human_label(queue: ReviewQueue) -> None:
    judged, _ = queue.add(new_item("eval", ref="run/1", input=MESSAGES, judge={
        "rubric": {"value": 4.0, "passed": True, "reason": "ok"}, "exact_match": {"value": 0.0, "passed": False}}))
    unjudged, _ = queue.add(new_item("production", ref="req", input=MESSAGES))
    pending, _ = queue.add(new_item("eval", ref="run/2", input=MESSAGES, judge={"rubric": {"passed": True}}))
    queue.label(judged.id, "alice", label="pass")
    queue.label(judged.id, "bob", label="fail", score=1)
    queue.label(unjudged.id, "alice", label="pass")
    pairs = queue.labelled_pairs(judge="rubric")
    assert [(j["judge"], j["passed"], h.reviewer, h.label) for j, h in pairs] == [
        ("rubric", True, "alice", "pass"), ("rubric", True, "bob", "fail")]
    assert len(queue.labelled_pairs()) == 4  # two verdicts x two labels; the unjudged and pending items none
    assert pending.id not in {h.item_id for _, h in queue.labelled_pairs()}


def record(request_id: str, tenant: str | None, content: bool = True) -> RequestRecord:
    return RequestRecord(request_id=request_id, started_at=1.0, ended_at=2.0, tenant=tenant, model="chat",
                         input=MESSAGES if content else None, output=ANSWER if content else None)


def test_a_logged_call_becomes_an_item_and_one_without_content_is_refused(
    queue: ReviewQueue, store: RecordStore,
) -> None:
    store.migrate()
    store.write([record("req_a", "a"), record("req_b", "b"), record("req_dark", "a", content=False)])
    item, created = queue.add_call("req_a", tenant="a")
    assert created and (item.source, item.ref, item.tenant, item.input, item.output) == (
        "production", "req_a", "a", MESSAGES, ANSWER)
    with pytest.raises(CallNotFound):
        queue.add_call("req_b", tenant="a")  # another tenant's call is not found
    with pytest.raises(ContentNotLogged, match="log_content"):
        queue.add_call("req_dark")
    with pytest.raises(CallNotFound):
        queue.add_call("req_missing")


def test_a_runs_failed_cases_are_sent_once_with_their_scores_as_verdicts(queue: ReviewQueue) -> None:
    cases = {"paris": Case("paris", messages=tuple(MESSAGES), reference="Paris")}
    results = [
        CaseResult("paris", "h1", "Lyon", scores={"exact_match": {"value": 0.0, "passed": False}}),
        CaseResult("ok", "h2", "4", scores={"exact_match": {"value": 1.0, "passed": True}}),
        CaseResult("broken", "h3", None, error="upstream_timeout: slow"),
    ]
    assert enqueue_eval_results(queue, "run_1", results, cases) == 2
    assert enqueue_eval_results(queue, "run_1", results, cases) == 0  # a resumed run adds none twice
    items = {item.ref: item for item in queue.list_items(source="eval").items}
    assert set(items) == {"run_1/paris", "run_1/broken"}
    paris = items["run_1/paris"]
    assert (paris.input, paris.output, paris.reference) == (MESSAGES, "Lyon", "Paris")
    assert paris.judge == {"exact_match": {"value": 0.0, "passed": False}}
    assert items["run_1/broken"].output == {"error": "upstream_timeout: slow"}
