"""Planted secrets never leave Keel: the master key, a virtual key, the upstream's API key (from the
environment), and the passwords in the PostgreSQL (request log) and Redis (cache, shared state) URLs.

A real `keel serve` takes a mix of good and bad calls, among them calls to an upstream that fails and
echoes the Authorization header it got (with every other header) back in its error body, plain and
mid-stream. Then every output is grepped for every secret: each answer's body and headers, the
request-log rows and every other table of its database (virtual keys are stored as hashes only),
what Keel wrote to Redis, the spool directory, the gateway's stdout/stderr, /metrics, the dashboard's
HTML and its API's JSON, the admin API's JSON and the OpenAPI document. None may appear anywhere.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from conftest import REDIS_URL, GatewayProcess, fresh_pg_database
from observability_helpers import eventually, read_records, store_section, wait_until_counted

from keel.testing.fake_server import ThreadedServer

MASTER = "sk-keel-master-" + secrets.token_hex(12)
UPSTREAM = "sk-upstream-" + secrets.token_hex(12)
PG_PASSWORD = "pg-pw-" + secrets.token_hex(8)
REDIS_PASSWORD = "redis-pw-" + secrets.token_hex(8)
UPSTREAM_ENV = "KEEL_TEST_LEAK_UPSTREAM_KEY"


async def echoing_upstream(request: web.Request) -> web.StreamResponse:
    """An OpenAI-compatible upstream that, asked to fail ("fail <status>" in the last message), puts
    every header it got, Authorization first, in its error body: what a careless vendor does."""
    body = await request.json()
    said = str(body["messages"][-1].get("content") or "")
    auth = request.headers.get("authorization", "")
    echoed = f"Incorrect API key provided: {auth}. You sent {dict(request.headers)}"
    if said.startswith("fail "):
        status = int(said.split()[1])
        if status == 502:  # not JSON at all
            return web.Response(status=502, text=f"<html>bad gateway for {auth}</html>", content_type="text/html")
        return web.json_response({"error": {"message": echoed, "type": "invalid_request_error", "param": None,
                                             "code": auth}}, status=status, headers={"x-echo": auth})
    chunk = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "fine"}, "finish_reason": None}]}
    if body.get("stream"):
        stream = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await stream.prepare(request)
        await stream.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if said == "cut":  # an error event mid-stream, the key in its message
            await stream.write(b"data: " + orjson.dumps({"error": {"message": echoed, "code": auth}}) + b"\n\n")
        else:
            await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream
    return web.json_response({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedServer]:
    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", echoing_upstream)])
    with ThreadedServer(app, "echoing-upstream") as server:
        yield server


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with fresh_pg_database("keel_e2e_leak") as url:
        # PostgreSQL here trusts local connections: the password is sent, and ignored.
        yield url.replace("postgresql://postgres@", f"postgresql://postgres:{PG_PASSWORD}@", 1)


class LeakGateway(GatewayProcess):
    """`keel serve` whose Redis keys start with `redis_prefix`."""

    def __init__(self, config: dict[str, Any], tmp: Path, env: dict[str, str], redis_prefix: str) -> None:
        super().__init__(config, tmp, env)
        self.redis_prefix = redis_prefix


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream: ThreadedServer, pg_url: str) -> Iterator[LeakGateway]:
    import redis

    assert PG_PASSWORD in pg_url
    redis_url = REDIS_URL.replace("redis://", f"redis://:{REDIS_PASSWORD}@", 1)
    try:  # the Redis here has no password: redis-py sends it and goes on without
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"redis at {REDIS_URL} not usable: {exc}")
    tmp = tmp_path_factory.mktemp("leak")
    prefix = "keel-test-leak-" + secrets.token_hex(4)
    config = {
        "models": [
            {"name": "sim", "deployments": [{"provider": "simulated"}]},
            {"name": "up", "retry": {"max_attempts": 1},
             "deployments": [{"provider": "openai", "model": "up-model", "api_key_env": UPSTREAM_ENV,
                              "base_url": f"http://127.0.0.1:{upstream.port}/v1"}]},
        ],
        "store": store_section(pg_url, tmp, spool_path=str(tmp / "spool" / "spool.jsonl")),
        "state": {"redis_url": redis_url, "key_prefix": prefix},
        "cache": {"backend": "redis", "exact": {"enabled": True}},
        "auth": {"virtual_keys": True},
    }
    process = LeakGateway(config, tmp, {"KEEL_MASTER_KEY": MASTER, UPSTREAM_ENV: UPSTREAM}, prefix)
    process.start()
    yield process
    process.stop()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)


def database_dump(url: str) -> list[tuple[str, str]]:
    """Every row of every table of the request-log database, as text: (table, rows)."""
    import psycopg

    with psycopg.connect(url.replace(f":{PG_PASSWORD}@", "@"), autocommit=True) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_type = 'BASE TABLE'")]
        dump = [(f"table {table}", "\n".join(str(row) for row in conn.execute(f"SELECT * FROM {table}")))
                for table in tables]
    assert any("keys" in table and rows for table, rows in dump), [table for table, _ in dump]
    return dump


def redis_dump(prefix: str) -> str:
    """Every key under `prefix` (the cache's entries, the shared counters) with its value, as text."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    assert keys, "the cache wrote nothing to Redis"
    return "\n".join(f"{key!r}: {client.dump(key)!r}" for key in keys)


def chat(model: str, content: str, **more: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": content}], **more})


def test_no_secret_appears_in_any_output(gw: LeakGateway, pg_url: str) -> None:
    master = {"authorization": f"Bearer {MASTER}"}
    created = httpx.post(gw.url + "/admin/keys", json={"tenant": "acme"}, headers=master, timeout=30)
    assert created.status_code == 201, created.text
    virtual = created.json()["key"]
    planted = {"master key": MASTER, "virtual key": virtual, "upstream key": UPSTREAM,
               "PostgreSQL password": PG_PASSWORD, "Redis password": REDIS_PASSWORD}
    as_virtual = {"authorization": f"Bearer {virtual}"}
    outputs: list[tuple[str, str]] = []  # (where, text)

    def call(method: str, path: str, headers: dict[str, str], body: bytes | None = None,
             expect: int | None = None) -> httpx.Response:
        answer = httpx.request(method, gw.url + path, content=body, timeout=60,
                               headers={"content-type": "application/json", **headers})
        where = f"{method} {path} -> {answer.status_code}"
        outputs.append((where + " body", answer.text))
        outputs.append((where + " headers", "\n".join(f"{k}: {v}" for k, v in answer.headers.multi_items())))
        if expect is not None:
            assert answer.status_code == expect, (where, answer.text)
        return answer

    chat_path = "/v1/chat/completions"
    for who in (master, as_virtual):
        call("POST", chat_path, who, chat("sim", "hello", temperature=0), expect=200)
        call("POST", chat_path, who, chat("sim", "hello", temperature=0), expect=200)  # a cache hit
        call("POST", chat_path, who, chat("up", "hello"), expect=200)
        call("POST", chat_path, who, chat("up", "hello", stream=True), expect=200)
        streamed_error = call("POST", chat_path, who, chat("up", "cut", stream=True), expect=200)
        assert "error" in streamed_error.text
        for status in (400, 401, 403, 404, 422, 429, 500, 502, 503):
            failed = call("POST", chat_path, who, chat("up", f"fail {status}"))
            assert failed.status_code >= 400, failed.text
        call("POST", "/v1/messages", who, orjson.dumps({"model": "up", "max_tokens": 5,
                                                        "messages": [{"role": "user", "content": "fail 400"}]}))
        call("POST", "/v1/responses", who, orjson.dumps({"model": "up", "input": "fail 500"}))
        call("POST", "/v1/completions", who, orjson.dumps({"model": "up", "prompt": "fail 429"}))
        call("POST", chat_path, who, b'{"model": "sim", "messages": [', expect=400)
        call("POST", chat_path, who, chat("nope", "hi"), expect=404)
        call("GET", "/v1/models", who, expect=200)
    for wrong in ({}, {"authorization": f"Bearer {MASTER}x"}, {"authorization": f"Bearer {virtual[:-1]}"},
                  {"authorization": MASTER}, {"x-api-key": virtual + "0"}):
        call("POST", chat_path, wrong, chat("sim", "hi"), expect=401)
    call("GET", "/admin/requests", as_virtual, expect=403)  # not an admin key
    good = call("POST", chat_path, master, chat("sim", "last"), expect=200)
    wait_until_counted([gw], 1, key=MASTER)

    rid = good.headers["x-keel-request-id"]
    eventually(lambda: any(row["request_id"] == rid for row in read_records(pg_url, since=time.time() - 3600)),
               "the last call's record (the writer writes in batches)")
    for path in ("/metrics", "/admin/keys", "/admin/requests", "/admin/budgets", "/openapi.json", "/readyz",
                 "/dashboard", "/dashboard/api/overview", "/dashboard/api/requests", "/dashboard/api/cost",
                 "/dashboard/api/filters", f"/dashboard/api/requests/{rid}"):
        call("GET", path, master)
    rows = read_records(pg_url, since=time.time() - 3600)
    assert len(rows) > 40
    outputs.append(("request-log rows", repr(rows)))
    outputs.extend(database_dump(pg_url))  # the keys (their hashes only), spans, stored responses, ...
    outputs.append(("redis", redis_dump(gw.redis_prefix)))
    for spooled in sorted((gw.config_path.parent / "spool").rglob("*")):
        if spooled.is_file():
            outputs.append((f"spool {spooled.name}", spooled.read_text(errors="replace")))
    gw.stop()  # the shutdown's own lines too
    outputs.append(("stdout/stderr", gw.log()))

    # The upstream's echo did reach the client, with the key taken out (so the grep above saw it pass).
    echoed = [text for where, text in outputs if "chat/completions -> 400 body" in where and "Incorrect" in text]
    assert len(echoed) >= 2 and all("Incorrect API key provided: [redacted]" in text for text in echoed)
    assert any("[redacted]" in text for where, text in outputs if "-> 200 body" in where)  # the stream's error event
    leaks = [f"{name} in {where}" for where, text in outputs for name, secret in planted.items() if secret in text]
    assert not leaks, "\n".join(leaks)
