"""What a cache hit leaves behind: the record's `cost_saved_usd`, the span's `keel.cost_saved_usd`,
the cache metrics, all from one scripted run through Keel (simulated provider, priced)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import RecordingSink

from keel.config import TracingConfig, parse_config
from keel.engine import Keel
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing
from keel.pipeline import Context
from keel.types import ChatRequest


def chat(model: str = "m", **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": model, "messages": [{"role": "user", "content": "What is 2+2?"}],
                                       "temperature": 0, **fields})


@pytest.fixture
async def observed(tmp_path: Path) -> AsyncIterator[Callable[[], tuple[Keel, RecordingSink, Metrics]]]:
    made: list[Keel] = []

    def make() -> tuple[Keel, RecordingSink, Metrics]:
        sink, metrics = RecordingSink(), Metrics()
        config = parse_config({
            "models": [
                {"name": "m", "deployments": [{"provider": "simulated", "price": {"input": 1, "output": 2}}]},
                {"name": "uncached", "cache": {"exact": {"enabled": False}},
                 "deployments": [{"provider": "simulated", "price": {"input": 1, "output": 2}}]},
            ],
            "cache": {"backend": "memory", "exact": {"enabled": True}},
            "store": {"url": f"sqlite:///{tmp_path}/keel.db", "spool_path": str(tmp_path / "spool.jsonl")},
        })
        keel = Keel(config, stages=[Observe(sink, Tracing(TracingConfig(), sink), metrics)])
        made.append(keel)
        return keel, sink, metrics

    yield make
    for keel in made:
        await keel.close()


async def scripted(keel: Keel) -> None:
    """1 miss, 3 hits, 1 bypass (no-cache) on "m"; 1 call to a model without the cache."""
    for _ in range(4):
        await keel.handle(chat(), Context())
    await keel.handle(chat(), Context(cache_control="no-cache"))
    await keel.handle(chat("uncached"), Context())


async def test_a_hit_records_what_the_miss_cost_as_saved_and_nothing_else_does(observed: Any) -> None:
    keel, sink, _ = observed()
    await scripted(keel)
    records = sink.records
    assert [r.cache_status for r in records] == ["miss", "hit_exact", "hit_exact", "hit_exact", "bypass", "none"]
    miss, hits = records[0], records[1:4]
    assert miss.cost_usd > 0
    for hit in hits:
        assert hit.outcome == "cached" and hit.cost_usd == 0
        assert hit.cost_saved_usd == miss.cost_usd
    assert [r.cost_saved_usd for r in (miss, records[4], records[5])] == [None, None, None]


async def test_the_span_of_a_hit_carries_the_cost_saved(observed: Any) -> None:
    keel, sink, _ = observed()
    await scripted(keel)
    calls = [s for s in sink.spans if s.parent_id is None]
    by_request = {s.request_id: s.attributes for s in calls}
    for record in sink.records:
        attributes = by_request[record.request_id]
        assert attributes["keel.cache_status"] == record.cache_status
        if record.cache_status == "hit_exact":
            assert attributes["keel.cost_saved_usd"] == record.cost_saved_usd > 0
        else:
            assert "keel.cost_saved_usd" not in attributes


async def test_cache_metrics_equal_what_the_records_say(observed: Any) -> None:
    keel, sink, metrics = observed()
    await scripted(keel)

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    counted = Counter((r.model or "", r.cache_status) for r in sink.records if r.cache_status != "none")
    assert counted == {("m", "miss"): 1, ("m", "hit_exact"): 3, ("m", "bypass"): 1}
    for (model, status), count in counted.items():
        assert value("keel_cache_requests_total", model=model, status=status) == count
    assert value("keel_cache_requests_total", model="uncached", status="none") == 0
    saved = sum(r.cost_saved_usd or 0.0 for r in sink.records)
    assert saved > 0
    assert value("keel_cache_saved_usd_total", model="m") == pytest.approx(saved)
    assert value("keel_cache_saved_usd_total", model="uncached") == 0
    body, _ = metrics.render()
    assert b'keel_cache_requests_total{model="m",status="hit_exact"} 3.0' in body
