"""Keel's upstream HTTP client against aiohttp: the same POSTs to the same fake upstream, in one
process, interleaved; CPU time of this process per request (the client's own cost).

    .venv/bin/python bench/http_client.py [--requests 5000] [--rounds 3]

The fake upstream (`keel.testing.fake_openai`, zero latency) runs in its own process, so the
CPU measured here is the client's: building and writing the request, parsing the answer,
pooling the connection. Plain answers are read whole; streams (20 chunks) are read into SSE
events, from aiohttp's lines and from Keel's network reads.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson

from keel.providers.http_client import UpstreamClient
from keel.providers.sse import read_events

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from overhead import free_port, wait_ready

PLAIN = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "Say something about benchmarks."}]})
STREAM = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "Say something."}]})


async def with_keel(client: UpstreamClient, body: bytes, stream: bool) -> None:
    response = await client.post("/chat/completions", body)
    if stream:
        async for _ in read_events(response.parts()):
            pass
    else:
        await response.read()
    response.release()


async def with_aiohttp(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> None:
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
        if stream:
            async for _ in read_events(response.content):  # its lines, as the providers read them before
                pass
        else:
            await response.read()


async def run(one: Callable[[], Awaitable[None]], total: int, concurrency: int) -> tuple[float, float]:
    """(CPU ms per request, requests/s)."""
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - cpu) / total * 1000, total / (time.perf_counter() - wall)


async def compare(base: str, args: argparse.Namespace) -> None:
    keel = UpstreamClient(base, {"content-type": "application/json"})
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    try:
        print(f"{'mode':<7} {'conc':>4} {'aiohttp CPU':>12} {'keel CPU':>9} {'ratio':>6} "
              f"{'aiohttp/s':>10} {'keel/s':>8}")
        for stream, body in ((False, PLAIN), (True, STREAM)):
            for concurrency in (1, 16):
                clients: dict[str, Callable[[], Awaitable[None]]] = {
                    "aiohttp": lambda b=body, s=stream: with_aiohttp(session, base + "/chat/completions", b, s),
                    "keel": lambda b=body, s=stream: with_keel(keel, b, s),
                }
                for one in clients.values():  # warm both
                    await run(one, 200, concurrency)
                rows: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
                for _ in range(args.rounds):
                    for name, one in clients.items():
                        rows[name].append(await run(one, args.requests, concurrency))
                cpu = {name: statistics.median(r[0] for r in v) for name, v in rows.items()}
                rps = {name: statistics.median(r[1] for r in v) for name, v in rows.items()}
                print(f"{'stream' if stream else 'plain':<7} {concurrency:>4} {cpu['aiohttp']:>10.3f}ms "
                      f"{cpu['keel']:>7.3f}ms {cpu['aiohttp'] / cpu['keel']:>6.2f} {rps['aiohttp']:>10.0f} "
                      f"{rps['keel']:>8.0f}")
    finally:
        await session.close()
        await keel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "keel.testing.fake_openai", "--port", str(port),
                                 "--chunks", "20"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(base + "/models", upstream)
        import uvloop

        uvloop.install()
        asyncio.run(compare(base, args))
    finally:
        upstream.terminate()
        upstream.wait(10)


if __name__ == "__main__":
    main()
