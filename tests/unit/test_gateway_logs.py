"""The gateway's log line for a refused request names the real reason; a value the client sent
is never quoted in it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from keel.config import parse_config
from keel.engine import Keel
from keel.server import create_app
from keel.server.app import REQUEST_ID


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.delenv("KEEL_MASTER_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    config = parse_config({"models": [
        {"name": "claude", "deployments": [{"provider": "anthropic", "model": "claude-3-5-haiku-latest"}]},
    ]})
    with TestClient(create_app(Keel(config))) as client:
        yield client


def failure_line(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    [line] = [r.getMessage() for r in caplog.records if r.name == "keel.gateway" and request_id in r.getMessage()]
    return line


def test_an_unsupported_endpoint_is_logged_as_unsupported_not_as_a_bad_parameter(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="keel.gateway"):
        response = client.post("/v1/embeddings", json={"model": "claude", "input": "hello"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported"
    line = failure_line(caplog, response.headers[REQUEST_ID])
    assert "400 unsupported: deployment 'anthropic/claude-3-5-haiku-latest' cannot create embeddings" in line
    assert "invalid parameter" not in line


def test_an_invalid_value_is_logged_by_its_parameter_without_the_value(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "4111 1111 1111 1111"
    with caplog.at_level(logging.WARNING, logger="keel.gateway"):
        response = client.post("/v1/chat/completions", json={"model": "claude", "messages": [
            {"role": "user", "content": "hi"}], "temperature": secret})
    assert response.status_code == 400
    line = failure_line(caplog, response.headers[REQUEST_ID])
    assert "400 invalid_request: invalid value for parameter 'temperature'" in line
    assert secret not in line
