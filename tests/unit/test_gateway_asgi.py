"""The gateway's hot routes in plain ASGI, driven message by message: what leaves when, and
what happens when the client goes away."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from conftest import RecordingSink

from keel.config import TracingConfig, parse_config
from keel.engine import Keel
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing
from keel.pipeline import Call, Completion, Next, Reply
from keel.server import create_app
from keel.server.app import Served, chat_completions
from keel.server.gateway import Answer, Incoming

BODY = {"model": "sim", "messages": [{"role": "user", "content": "hello"}]}


def scope(method: str = "POST", path: str = "/v1/chat/completions", headers: list[tuple[bytes, bytes]] | None = None
          ) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": headers or [], "query_string": b"",
            "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 1),
            "root_path": "", "raw_path": path.encode()}


class Client:
    """The ASGI server's side: body messages to receive, sent messages recorded with `events`."""

    def __init__(self, body: bytes, pieces: int = 1, leave_after_writes: int | None = None) -> None:
        size = max(1, -(-len(body) // pieces))
        parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
        self.incoming: list[dict[str, Any]] = [
            {"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]
        self.gone = asyncio.Event()
        self.events: list[str] = []
        self.sent: list[dict[str, Any]] = []
        self.leave_after_writes = leave_after_writes

    async def receive(self) -> dict[str, Any]:
        if self.incoming:
            return self.incoming.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self.events.append(message["type"])
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.gone.set()  # as uvicorn does: once the response is complete, receive() says disconnect
        if self.events.count("http.response.body") == self.leave_after_writes:
            self.gone.set()

    def status(self) -> int:
        return int(self.sent[0]["status"])

    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_MASTER_KEY", raising=False)


def sim(**deployment: Any) -> Any:
    return parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated", **deployment}]}],
                         "store": {"url": "sqlite:///keel.db"}})


async def test_an_answer_leaves_before_its_bookkeeping_runs() -> None:
    client = Client(orjson.dumps(BODY))

    class Bookkeeping:
        async def __call__(self, call: Call, next: Next) -> Reply:
            reply = await next(call)
            assert isinstance(reply, Completion)
            reply.on_finish(lambda _: client.events.append("bookkeeping"))
            return reply

    keel = Keel(sim(), stages=[Bookkeeping()])
    app = create_app(keel)
    await app(scope(), client.receive, client.send)
    await keel.close()
    assert client.events == ["http.response.start", "http.response.body", "bookkeeping"]
    assert client.status() == 200
    headers = client.headers()
    assert headers[b"x-keel-request-id"].startswith(b"req_")
    assert int(headers[b"content-length"]) == len(client.body())
    assert orjson.loads(client.body())["choices"][0]["message"]["content"] == "echo: hello"


async def test_a_body_in_pieces_is_joined_and_an_oversized_one_refused() -> None:
    keel = Keel(sim())
    app = create_app(keel)
    client = Client(orjson.dumps(BODY), pieces=5)
    await app(scope(), client.receive, client.send)
    assert client.status() == 200

    big = orjson.dumps({**BODY, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]})
    client = Client(big, pieces=40)
    await app(scope(), client.receive, client.send)
    assert client.status() == 413
    assert orjson.loads(client.body())["error"]["code"] == "request_too_large"
    await keel.close()


async def test_wrong_method_on_a_hot_path_is_405_with_allow() -> None:
    keel = Keel(sim())
    client = Client(b"")
    await create_app(keel)(scope(method="GET"), client.receive, client.send)
    await keel.close()
    assert client.status() == 405
    assert client.headers()[b"allow"] == b"POST"
    assert orjson.loads(client.body())["error"]["code"] == "method_not_allowed"


async def test_a_client_that_leaves_mid_stream_closes_it_and_the_call_is_logged_as_closed() -> None:
    sink = RecordingSink()
    keel = Keel(sim(token_delay_ms=20, template="{last_user_message} " * 50),
                stages=[Observe(sink, Tracing(TracingConfig(to_store=False)), Metrics())])
    client = Client(orjson.dumps({**BODY, "stream": True}), leave_after_writes=3)
    await asyncio.wait_for(create_app(keel)(scope(), client.receive, client.send), 5)  # returns, does not raise
    await keel.close()
    assert client.status() == 200
    assert client.headers()[b"content-type"].startswith(b"text/event-stream")
    assert b"[DONE]" not in client.body()
    record = sink.only()
    assert record.outcome == "client_closed" and record.stream


async def test_a_client_that_leaves_before_sending_the_body_is_logged_as_closed() -> None:
    sink = RecordingSink()
    keel = Keel(sim(), stages=[Observe(sink, Tracing(TracingConfig(to_store=False)), Metrics())])
    client = Client(orjson.dumps(BODY), pieces=2)
    client.incoming.pop()  # the second half never comes
    client.gone.set()
    await create_app(keel)(scope(), client.receive, client.send)
    await keel.close()
    assert sink.only().outcome == "client_closed"


async def stream_logged_in_order(**deployment: Any) -> tuple[Client, RecordingSink]:
    """A stream served to a client whose events show when the call's record was written."""
    client, sink = Client(orjson.dumps({**BODY, "stream": True})), RecordingSink()

    class Ordered(RecordingSink):
        def submit(self, record: Any) -> None:
            client.events.append("record")
            sink.submit(record)

    keel = Keel(sim(**deployment), stages=[Observe(Ordered(), Tracing(TracingConfig(to_store=False)), Metrics())])
    await create_app(keel)(scope(), client.receive, client.send)
    await keel.close()
    return client, sink


async def test_a_finished_stream_is_logged_once_its_end_has_been_written() -> None:
    client, sink = await stream_logged_in_order(template="one two three")
    assert client.body().endswith(b"data: [DONE]\n\n")
    assert client.events[-2:] == ["http.response.body", "record"]
    assert client.sent[-1].get("more_body") is False
    assert sink.only().outcome == "ok"


async def test_a_trailing_slash_reaches_the_same_endpoint() -> None:
    keel = Keel(sim())
    client = Client(orjson.dumps(BODY))
    await create_app(keel)(scope(path="/v1/chat/completions/"), client.receive, client.send)
    await keel.close()
    assert client.status() == 200
    assert orjson.loads(client.body())["object"] == "chat.completion"


async def test_a_stream_that_cannot_be_sent_is_still_closed_and_logged() -> None:
    sink = RecordingSink()
    keel = Keel(sim(), stages=[Observe(sink, Tracing(TracingConfig(to_store=False)), Metrics())])
    client = Client(orjson.dumps({**BODY, "stream": True}))

    async def broken_send(message: dict[str, Any]) -> None:
        raise RuntimeError("the server could not write the headers")

    with pytest.raises(RuntimeError):
        await create_app(keel)(scope(), client.receive, broken_send)
    await keel.close()
    assert sink.only().outcome == "client_closed"


async def test_a_stream_that_fails_midway_is_logged_once_its_error_event_has_been_written() -> None:
    client, sink = await stream_logged_in_order(template="one two three four", errors={"cut": 1.0})
    assert b'"code":"upstream_connection_error"' in client.body().split(b"data: ")[-1]
    assert client.events[-2:] == ["http.response.body", "record"]
    assert sink.only().outcome == "error"


async def test_a_hot_route_is_a_function_of_the_shared_state_and_the_request() -> None:
    settled: list[str] = []

    class Bookkeeping:
        async def __call__(self, call: Call, next: Next) -> Reply:
            reply = await next(call)
            reply.on_finish(lambda _: settled.append(call.ctx.request_id))
            return reply

    keel = Keel(sim(), stages=[Bookkeeping()])
    client = Client(orjson.dumps(BODY))
    answer = await chat_completions(Served.of(keel), Incoming(scope(), client.receive, "req_alone"))
    await keel.close()
    assert isinstance(answer, Answer) and answer.settles is not None
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"] == "echo: hello"
    assert settled == [], "the answer has not been delivered yet"
    await answer.settles.settle()
    assert settled == ["req_alone"]
