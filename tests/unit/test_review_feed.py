"""The review queue's feeds through a real `Keel` (simulated provider, SQLite request log): a seeded share
of finished calls and every failed one become items, Keel's own calls never; no content logged, no items;
the semantic cache's hook makes a redacted `semantic_cache` item; the online judge gets its share off the
request path, within its queue's bound and its budget, and its verdict lands on the call's item."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from keel.cache.semantic import SemanticHit
from keel.config import parse_config
from keel.engine import Keel
from keel.errors import BudgetExceeded, KeelError
from keel.observability.record import RequestRecord
from keel.pipeline import Context
from keel.types import ChatRequest

SEED = 7


def make_keel(tmp_path: Path, review: dict[str, Any], *, store: dict[str, Any] | None = None,
              **simulated: Any) -> Keel:
    config = parse_config({
        "models": [{"name": "chat", "retry": {"max_attempts": 1},
                    "deployments": [{"provider": "simulated", "seed": SEED, **simulated}]}],
        "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}", **(store or {})}, "review": review,
    })
    keel = Keel(config)
    keel.review.rng = random.Random(SEED)
    return keel


async def ask(keel: Keel, text: str, feature: str | None = None) -> bool:
    """One call; whether it was answered."""
    request = ChatRequest.model_validate({"model": "chat", "messages": [{"role": "user", "content": text}]})
    try:
        await keel.handle(request, Context(feature=feature))
    except KeelError:
        return False
    return True


async def test_a_seeded_share_of_calls_and_every_failed_one_become_items(tmp_path: Path) -> None:
    keel = make_keel(tmp_path, {"sample_rate": 0.3, "failed": True}, errors={"500": 0.25})
    async with keel:
        answered = [await ask(keel, f"question {i}") for i in range(40)]
        for i in range(5):
            await ask(keel, f"guardrail question {i}", feature="keel.guardrail")  # Keel's own: never sampled
        assert keel.review.writer.flush()
        items = keel.review.queue.list_items(limit=100).items
    draws = random.Random(SEED)
    expected = sum(1 for ok in answered if not ok) + sum(1 for ok in answered if ok and draws.random() < 0.3)
    assert 0 < answered.count(False) < 40  # the test sees both kinds
    assert len(items) == expected
    assert {item.source for item in items} == {"production"}
    assert all(item.input[0]["content"].startswith("question") for item in items)
    assert sum(1 for item in items if item.output is None) == answered.count(False)  # the failed ones: no answer


async def test_only_failed_draws_from_failed_calls_only(tmp_path: Path) -> None:
    keel = make_keel(tmp_path, {"sample_rate": 1.0, "only_failed": True}, errors={"500": 0.3})
    async with keel:
        answered = [await ask(keel, f"q{i}") for i in range(20)]
        assert keel.review.writer.flush()
        items = keel.review.queue.list_items(limit=100).items
    assert len(items) == answered.count(False) > 0 and all(item.output is None for item in items)


async def test_calls_logged_without_content_make_no_items_and_cost_no_wrapper(tmp_path: Path) -> None:
    keel = make_keel(tmp_path, {"sample_rate": 1.0}, store={"log_content": False})
    assert keel.observe.sink is keel.writer  # nothing samples: the record goes straight to the log
    async with keel:
        assert await ask(keel, "hello")
    assert not keel.review.writer.started


async def test_a_semantic_hit_becomes_a_redacted_semantic_cache_item(tmp_path: Path) -> None:
    keel = make_keel(tmp_path, {}, store={"redact": [r"sk-[a-z0-9]{8}"]})
    completion = {"choices": [{"message": {"role": "assistant", "content": "use sk-abcdefgh here"}}]}
    hit = SemanticHit("req_1", "team-a", "chat", "my key sk-12345678?", "my key?", 0.991, completion)
    keel.review.semantic_hit(hit)
    assert keel.review.writer.flush()
    [item] = keel.review.queue.list_items().items
    await keel.close()
    assert (item.source, item.ref, item.tenant) == ("semantic_cache", "req_1", "team-a")
    assert item.input == [{"role": "user", "content": "my key [REDACTED]?"}]
    assert item.output == {"role": "assistant", "content": "use [REDACTED] here"}
    assert item.reference == {"cached_query": "my key?", "similarity": 0.991, "model": "chat"}


def test_the_semantic_cache_is_given_the_feed_as_its_review_hook(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    config = parse_config({
        "models": [{"name": "chat", "deployments": [{"provider": "simulated"}],
                    "cache": {"semantic": {"enabled": True, "review_sample_rate": 0.5}}}],
        "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}"},
    })
    keel = Keel(config)
    assert keel.cache.semantic is not None and keel.cache.semantic.review == keel.review.semantic_hit


async def test_the_online_judge_gets_its_share_and_its_verdict_lands_on_the_item(tmp_path: Path) -> None:
    keel = make_keel(tmp_path, {"sample_rate": 1.0, "judge_sample_rate": 1.0})
    judged: list[RequestRecord] = []

    async def judge(record: RequestRecord) -> dict[str, Any]:
        judged.append(record)
        return {"value": 5.0, "passed": True, "reason": "fine"}

    keel.review.judge = judge
    async with keel:
        for i in range(3):
            assert await ask(keel, f"q{i}")
        await ask(keel, "the judge's own call", feature="keel.judge")
        await keel.review.online.idle()
        assert keel.review.writer.flush()
        items = keel.review.queue.list_items().items
    assert [r.input[0]["content"] for r in judged] == ["q0", "q1", "q2"]
    assert [item.judge for item in items] == [{"online": {"value": 5.0, "passed": True, "reason": "fine"}}] * 3
    assert keel.review.online.stats() == {"judged": 3, "dropped": 0, "failed": 0, "over_budget": 0}


async def test_a_full_judge_queue_drops_and_a_spent_budget_is_counted_without_touching_the_calls(
    tmp_path: Path,
) -> None:
    keel = make_keel(tmp_path, {"judge_sample_rate": 1.0, "judge_queue_size": 1, "judge_concurrency": 1})
    release, started = asyncio.Event(), asyncio.Event()

    async def judge(record: RequestRecord) -> None:
        started.set()
        await release.wait()
        raise BudgetExceeded("spent", scope="feature", window="day", limit_usd=0.01, resets_in=60)

    keel.review.judge = judge
    async with keel:
        assert await ask(keel, "first")  # taken by the worker, which waits
        await started.wait()
        assert await ask(keel, "second")  # fills the queue
        assert await ask(keel, "third")  # dropped: the call itself is answered all the same
        release.set()
        await keel.review.online.idle()
        stats = keel.review.online.stats()
    assert stats == {"judged": 0, "dropped": 1, "failed": 0, "over_budget": 2}


async def test_the_shipped_online_judge_scores_sampled_calls_and_stores_their_scores(tmp_path: Path) -> None:
    from keel.evals.online_judge import online_judge
    from keel.evals.online_scores import OnlineScores

    keel = make_keel(tmp_path, {"judge_sample_rate": 1.0})
    keel.review.judge = online_judge(keel, "chat", scale="pass_fail")
    async with keel:
        for i in range(3):
            assert await ask(keel, f"q{i}")
        await keel.review.online.idle()
        assert keel.review.writer.flush()
        scores = OnlineScores(keel.review.queue.store).load(time.time() - 3600, time.time() + 1)
    # The simulated judge answers the schema's first value: "pass". Its own calls are not judged again.
    assert len(scores) == 3 and all(s.model == "chat" and s.value == 1.0 for s in scores)
    assert all(s.verdict["details"]["judge_model"] == "chat" for s in scores)
    assert keel.review.online.stats()["judged"] == 3
