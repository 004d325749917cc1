"""The floor of the stack: a bare FastAPI pass-through with no stages, for `bench/overhead.py`.

It forwards the request body as-is to the upstream over one pooled aiohttp session and the
answer back (streams chunk by chunk), and does nothing else: whatever Keel spends above this
is Keel's own cost. Run: `uvicorn bench.passthrough_floor:app` with UPSTREAM set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:9100/v1")
session: aiohttp.ClientSession | None = None


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    yield
    await session.close()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    assert session is not None
    body = await request.body()
    upstream = await session.post(UPSTREAM + "/chat/completions", data=body,
                                  headers={"content-type": "application/json"})
    if upstream.headers.get("content-type", "").startswith("text/event-stream"):

        async def relay() -> AsyncIterator[bytes]:
            async for line in upstream.content:
                yield line
            upstream.release()

        return StreamingResponse(relay(), media_type="text/event-stream")
    data = await upstream.read()
    upstream.release()
    return Response(data, media_type="application/json")


@app.get("/readyz")
async def ready() -> Response:
    return Response(b"{}", media_type="application/json")
