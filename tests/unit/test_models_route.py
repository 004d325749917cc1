"""`/v1/models` and `/v1/models/{model}` in OpenAI's shapes, and the 404 of an unknown URL that
lists every route served."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from keel.config import parse_config
from keel.engine import Keel
from keel.server import create_app

KEY = "sk-keel-models"


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("KEEL_MASTER_KEY", KEY)
    config = parse_config({"models": [
        {"name": "sim", "deployments": [{"provider": "simulated"}]},
        {"name": "org/big", "deployments": [{"provider": "simulated"}]},
    ]})
    with TestClient(create_app(Keel(config)), headers={"authorization": f"Bearer {KEY}"}) as client:
        yield client


def test_the_list_is_stamped_with_the_gateways_start_the_same_on_every_call(client: TestClient) -> None:
    first, second = client.get("/v1/models").json(), client.get("/v1/models").json()
    assert first == second
    assert [m["id"] for m in first["data"]] == ["sim", "org/big"]
    created = {m["created"] for m in first["data"]}
    assert len(created) == 1 and abs(created.pop() - time.time()) < 3600  # not a made-up date
    assert all(m["object"] == "model" and m["owned_by"] == "keel" for m in first["data"])


def test_one_model_is_retrieved_in_openais_shape(client: TestClient) -> None:
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    for name in ("sim", "org/big"):
        response = client.get(f"/v1/models/{name}")
        assert response.status_code == 200
        assert response.json() == listed[name]


def test_an_unknown_model_is_a_404_model_not_found_in_openais_shape(client: TestClient) -> None:
    response = client.get("/v1/models/gpt-9")
    assert response.status_code == 404
    assert response.json() == {"error": {
        "message": "The model 'gpt-9' does not exist. Models served here: org/big, sim.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found",
    }}


def test_retrieving_a_model_needs_the_key(client: TestClient) -> None:
    response = client.get("/v1/models/sim", headers={"authorization": "Bearer wrong"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_an_unknown_url_is_answered_with_every_route_served(client: TestClient) -> None:
    response = client.get("/v2/chat")
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    for route in ("POST /v1/chat/completions", "POST /v1/embeddings", "GET /v1/models", "GET /v1/models/{model}",
                  "GET /healthz", "GET /readyz", "GET /metrics"):
        assert route in message
