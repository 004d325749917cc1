"""Tracing and the request log, in-process: two chained calls under one trace, then their records
read back from the store. A simulated model with a price, so the costs are not zero; no network.

    python examples/observability.py
"""

import asyncio
import tempfile
import time
from pathlib import Path

from keel import Keel
from keel.config import parse_config
from keel.observability.store import RecordStore


def config(folder: Path) -> dict[str, object]:
    return {
        "models": [{
            "name": "sim",
            "deployments": [{
                "provider": "simulated",
                "latency_ms": 30,
                "template": "draft answer to: {last_user_message}",
                "price": {"input": 2.5, "output": 10},  # USD per 1M tokens (simulated costs 0 without it)
            }],
        }],
        # The log of this example in a folder of its own (the default is ./keel.db).
        "store": {"url": f"sqlite:///{folder / 'keel.db'}", "spool_path": str(folder / "spool.jsonl")},
    }


async def main(folder: Path) -> None:
    started = time.time()
    keel = Keel(parse_config(config(folder)))
    async with keel:  # leaving it closes the providers and flushes the request log
        with keel.trace("answer", question="boats"):  # one trace: the calls inside are its children
            question = [{"role": "user", "content": "Why do boats float?"}]
            draft = await keel.chat(model="sim", messages=question, user="ann", metadata={"feature": "faq"})
            text = draft.choices[0].message.content or ""
            final = await keel.chat(
                model="sim", user="ann", metadata={"feature": "faq"},
                messages=[*question, {"role": "assistant", "content": text},
                          {"role": "user", "content": "Make it shorter."}],
            )
        print(final.choices[0].message.content)

    store = RecordStore(keel.config.store.url)  # what `keel report` and the dashboard read
    try:
        records = store.records(since=started)
        for record in records:
            print(
                f"{record['request_id']}  {record['outcome']:<4} {record['latency_ms']:6.1f} ms  "
                f"{record['prompt_tokens']:>3}+{record['completion_tokens']:<3} tokens  "
                f"${record['cost_usd']:.6f}  trace {record['trace_id']}"
            )
        trace_ids = {record["trace_id"] for record in records}
        print(f"{len(records)} calls, {len(trace_ids)} trace")
        depth: dict[str, int] = {}
        for span in store.spans(records[0]["trace_id"]):  # in the order they started: parents first
            depth[span["span_id"]] = depth.get(span["parent_id"], -1) + 1
            name = "  " * depth[span["span_id"]] + span["name"]
            print(f"  {name:<32} {(span['ended_at'] - span['started_at']) * 1000:6.1f} ms")
    finally:
        store.close()


with tempfile.TemporaryDirectory() as folder:
    asyncio.run(main(Path(folder)))
