"""Keys of the wrong format and a key used for a model outside its tenant's list, with virtual
keys on (SQLite store, a key made by `keel keys create`), through a real `keel serve`.

A key that is not a key Keel made is a 401 `invalid_api_key` (OpenAI's status for a bad key:
the SDKs raise AuthenticationError and never retry it); a good key asking for a model its list
leaves out is a 403 `model_not_allowed` (the caller is known, the model is not theirs: OpenAI's
PermissionDeniedError). Each leaves exactly one record, and the gateway serves the next call.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest
from observability_helpers import calls_counted
from test_bad_input import assert_openai_error
from test_bad_input_bodies import CHAT, LoggedGateway, then_one_record_and_still_serving
from test_keys_e2e import create_key

MASTER = "sk-master-bad-keys"
BODY = orjson.dumps({"model": "sim", "messages": [{"role": "user", "content": "hi"}]})
WELL_FORMED_UNKNOWN = "sk-keel-" + "A" * 43


class Tenants:
    """A gateway with virtual keys on, and team-a's key, which may use `sim` only."""

    def __init__(self, gw: LoggedGateway, team_a: str) -> None:
        self.gw, self.team_a = gw, team_a


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    tmp = tmp_path_factory.mktemp("bad-keys-gw")
    config = {"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]},
                         {"name": "big", "deployments": [{"provider": "simulated"}]}],
              "auth": {"virtual_keys": True}}
    gw = LoggedGateway(config, tmp, MASTER)
    team_a = create_key(gw.config, tmp, "--tenant", "team-a", "--model", "sim", "--label", "bad-input")
    gw.start()
    yield Tenants(gw, team_a)
    gw.stop()


def send(gw: LoggedGateway, authorization: bytes | None, model: str = "sim", stream: bool = False) -> httpx.Response:
    headers = {b"content-type": b"application/json"}
    if authorization is not None:
        headers[b"authorization"] = authorization
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    return httpx.post(gw.url + CHAT, content=body, headers=headers, timeout=30)


@pytest.mark.parametrize(("authorization", "says"), [
    (b"Bearer sk-not-a-keel-key", "not in Keel's format"),
    (b"Bearer sk-keel-" + b"A" * 42, "not in Keel's format"),  # one character short
    (b"Bearer sk-keel-" + b"!" * 43, "not in Keel's format"),
    (b"Bearer sk-keel-" + b"A" * 8000, "not in Keel's format"),
    (b"Bearer sk-keel-\xff\xfe" + b"A" * 41, "not in Keel's format"),  # latin-1 bytes, as a header may hold
    (b"Bearer " + WELL_FORMED_UNKNOWN.encode(), "not known here"),
    (b"Bearer", "No API key was sent"),
    (b"Basic c2s6eA==", "No API key was sent"),
    (None, "No API key was sent"),
], ids=["foreign", "too-short", "bad-characters", "8kB", "latin-1", "unknown", "scheme-only", "basic", "missing"])
def test_a_key_of_the_wrong_format_is_a_401_with_one_record(
    tenants: Tenants, authorization: bytes | None, says: str,
) -> None:
    gw = tenants.gw
    before = calls_counted(gw, key=MASTER)
    response = send(gw, authorization)
    error = assert_openai_error(gw, response, 401, "invalid_api_key")
    assert error["type"] == "authentication_error"
    assert says in error["message"] and "Authorization: Bearer" in error["message"]
    row = then_one_record_and_still_serving(gw, response, before)
    assert row["tenant"] is None and row["error_type"] == "invalid_api_key"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_tenants_key_asking_for_a_model_outside_its_list_is_a_403_with_one_record(
    tenants: Tenants, stream: bool,
) -> None:
    gw = tenants.gw
    allowed = send(gw, b"Bearer " + tenants.team_a.encode(), "sim")
    assert allowed.status_code == 200, allowed.text  # the key works; only the model is refused
    before = calls_counted(gw, key=MASTER)
    response = send(gw, b"Bearer " + tenants.team_a.encode(), "big", stream)
    error = assert_openai_error(gw, response, 403, "model_not_allowed", param="model")
    assert error["type"] == "permission_error"
    assert "'big'" in error["message"] and "sim" in error["message"] and tenants.team_a not in response.text
    row = then_one_record_and_still_serving(gw, response, before)
    assert row["tenant"] == "team-a" and row["model"] == "big"
    assert row["key_id"].startswith("vk_") and tenants.team_a not in repr(row)


def test_the_master_key_may_use_every_model(tenants: Tenants) -> None:
    response = send(tenants.gw, b"Bearer " + MASTER.encode(), "big")
    assert response.status_code == 200, response.text
