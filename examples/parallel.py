"""Five independent calls and an aggregation step, sequential against parallel (`keel.map`).

    python examples/parallel.py

Offline: a simulated model that answers after 200 ms. The five questions do not depend on each
other, so `keel.map` runs them at once; the aggregation waits for all five. Sequential: six calls
one after another (about 1.2 s); parallel: five together, then one (about 0.4 s).
"""

from __future__ import annotations

import asyncio
import time

from keel import Keel
from keel.config import KeelConfig, parse_config

ASPECTS = ["history", "growing", "processing", "brewing", "health"]


def config(latency_ms: float = 200) -> KeelConfig:
    """One simulated model with a fixed latency; the request log in memory (nothing left behind)."""
    return parse_config({
        "models": [{"name": "sim", "deployments": [{"provider": "simulated", "latency_ms": latency_ms,
                                                    "template": "notes on {last_user_message}"}]}],
        "store": {"url": "sqlite:///:memory:"},
    })


async def ask(keel: Keel, topic: str, aspect: str) -> str:
    reply = await keel.chat(model="sim", messages=[{"role": "user", "content": f"{aspect} of {topic}"}])
    return reply.choices[0].message.content or ""


async def aggregate(keel: Keel, topic: str, notes: list[str]) -> str:
    """The step that needs every answer: one more call over all of them."""
    joined = "; ".join(notes)
    return await ask(keel, topic, f"a summary of [{joined}]")


async def in_sequence(keel: Keel, topic: str) -> str:
    notes = [await ask(keel, topic, aspect) for aspect in ASPECTS]
    return await aggregate(keel, topic, notes)


async def in_parallel(keel: Keel, topic: str) -> str:
    results = await keel.map(lambda aspect: ask(keel, topic, aspect), ASPECTS, concurrency=5, name="research")
    notes = [r for r in results if not isinstance(r, Exception)]  # an item's error is in its place
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        print(f"{len(failed)} of {len(results)} calls failed; the first: {failed[0]}")
    return await aggregate(keel, topic, notes)


async def main() -> float:
    async with Keel(config()) as keel:
        started = time.perf_counter()
        await in_sequence(keel, "tea")
        sequential = time.perf_counter() - started

        started = time.perf_counter()
        report = await in_parallel(keel, "tea")
        concurrent = time.perf_counter() - started
    print(report)
    print(f"sequential: {sequential:.2f} s")
    print(f"parallel:   {concurrent:.2f} s")
    print(f"speed-up: {sequential / concurrent:.1f}x")
    return sequential / concurrent


if __name__ == "__main__":
    asyncio.run(main())
