"""The dashboard's sign-in: signed, stateless session cookies; the admin API answering a session as it
answers a bearer key; CSRF refusals for unsafe requests by cookie; a revoked key's session dying with it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from keel.auth.keys import digest
from keel.config import parse_config
from keel.dashboard.auth import COOKIE, CSRF_HEADER, SessionSigner
from keel.dashboard.pages import next_page
from keel.engine import Keel
from keel.server import create_app

MASTER = "master-key-of-the-dashboard-test"
ORIGIN = {"origin": "http://testserver"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_cookie_reads_back_and_any_change_or_other_secret_spoils_it() -> None:
    clock = Clock()
    signer = SessionSigner(MASTER, clock=clock, ttl_s=60)
    cookie, session = signer.issue(digest(MASTER))
    read = signer.read(cookie)
    assert read == session and read.key_digest == digest(MASTER) and read.csrf
    assert digest(MASTER) not in cookie and MASTER not in cookie  # the payload is base64: not the digest in clear
    version, body, signature = cookie.split(".")
    other_body = SessionSigner(MASTER, clock=clock).issue(digest("another key"))[0].split(".")[1]
    spoiled_ones = (f"{version}.{other_body}.{signature}", f"{version}.{body}.{signature[:-2]}AA",
                    f"v2.{body}.{signature}", cookie + "x", "", "v1..", "garbage")
    for spoiled in spoiled_ones:
        assert signer.read(spoiled) is None, spoiled
    assert SessionSigner("another master key", clock=clock).read(cookie) is None
    assert SessionSigner(MASTER, clock=clock).read(cookie) == session  # another worker with the same config
    clock.now += 61
    assert signer.read(cookie) is None


def test_each_session_has_its_own_csrf_token() -> None:
    signer = SessionSigner(MASTER)
    first, second = signer.issue("d" * 64)[1], signer.issue("d" * 64)[1]
    assert first.csrf != second.csrf


@pytest.mark.parametrize(("asked", "target"), [
    ("/dashboard/cost?range=24h", "/dashboard/cost?range=24h"),
    ("https://evil.example/dashboard/", "/dashboard/overview"),
    ("//evil.example/dashboard/", "/dashboard/overview"),
    ("/\\evil.example/dashboard/", "/dashboard/overview"),
    ("/admin/keys", "/dashboard/overview"),
    (None, "/dashboard/overview"),
])
def test_after_signing_in_only_a_dashboard_page_of_this_gateway_is_a_target(asked: str | None, target: str) -> None:
    assert next_page(asked) == target


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("KEEL_MASTER_KEY", MASTER)
    cfg = parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
                        "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}"}, "auth": {"virtual_keys": True}})
    with TestClient(create_app(Keel(cfg))) as client:
        yield client


def sign_in(client: TestClient, key: str) -> str:
    """Sign in through the form; the session's CSRF token, read from a page as the dashboard's scripts do."""
    answer = client.post("/dashboard/login", data={"key": key, "next": "/dashboard/keys"}, headers=ORIGIN,
                         follow_redirects=False)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/dashboard/keys"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=v1.") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/" in cookie
    page = client.get("/dashboard/keys", headers={"accept": "text/html"})
    assert page.status_code == 200
    token = re.search(r'<meta name="keel-csrf" content="([^"]+)"', page.text)
    assert token is not None
    return token.group(1)


def new_key(client: TestClient, **spec: Any) -> dict[str, Any]:
    made = client.post("/admin/keys", json=spec, headers={"authorization": f"Bearer {MASTER}"})
    assert made.status_code == 201, made.text
    key: dict[str, Any] = made.json()
    return key


def test_without_a_key_a_browser_is_sent_to_the_login_form_and_a_script_gets_401(client: TestClient) -> None:
    browser = client.get("/dashboard/cost?range=24h", headers={"accept": "text/html,application/xhtml+xml"},
                         follow_redirects=False)
    assert browser.status_code == 303
    assert browser.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fcost%3Frange%3D24h"
    script = client.get("/dashboard/cost")
    assert script.status_code == 401 and script.json()["error"]["code"] == "invalid_api_key"
    assert "/dashboard/login" in script.json()["error"]["message"]
    assert client.get("/admin/keys").status_code == 401
    form = client.get("/dashboard/login")
    assert form.status_code == 200 and 'name="key"' in form.text
    assert "frame-ancestors 'none'" in form.headers["content-security-policy"]


def test_a_bearer_admin_key_opens_the_pages_too(client: TestClient) -> None:
    page = client.get("/dashboard/overview", headers={"authorization": f"Bearer {MASTER}"})
    assert page.status_code == 200 and 'data-page="overview"' in page.text
    assert page.headers["cache-control"] == "no-store"


def test_a_wrong_key_or_a_key_for_models_only_does_not_sign_in(client: TestClient) -> None:
    wrong = client.post("/dashboard/login", data={"key": "not-the-key"}, headers=ORIGIN)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers and 'role="alert"' in wrong.text
    caller = new_key(client, tenant="team-a")["key"]
    refused = client.post("/dashboard/login", data={"key": caller}, headers=ORIGIN)
    assert refused.status_code == 403 and "set-cookie" not in refused.headers
    assert "may call models but not the admin API" in refused.text
    elsewhere = client.post("/dashboard/login", data={"key": MASTER}, headers={"origin": "https://evil.example"})
    assert elsewhere.status_code == 403 and "set-cookie" not in elsewhere.headers


def test_a_session_reaches_the_admin_api_and_unsafe_calls_need_the_origin_and_the_token(client: TestClient) -> None:
    token = sign_in(client, MASTER)
    assert client.get("/admin/keys").status_code == 200  # the cookie alone, as the pages' scripts send it
    spec = {"tenant": "team-a", "owner": "alice"}
    no_token = client.post("/admin/keys", json=spec, headers=ORIGIN)
    assert no_token.status_code == 403 and no_token.json()["error"]["code"] == "csrf_failed"
    elsewhere = client.post("/admin/keys", json=spec, headers={"origin": "https://evil.example", CSRF_HEADER: token})
    assert elsewhere.status_code == 403 and elsewhere.json()["error"]["code"] == "csrf_failed"
    no_origin = client.post("/admin/keys", json=spec, headers={CSRF_HEADER: token})
    assert no_origin.status_code == 403
    forged = client.post("/admin/keys", json=spec, headers={**ORIGIN, CSRF_HEADER: token[:-3] + "AAA"})
    assert forged.status_code == 403
    made = client.post("/admin/keys", json=spec, headers={**ORIGIN, CSRF_HEADER: token})
    assert made.status_code == 201, made.text
    by_referer = client.delete(f"/admin/keys/{made.json()['id']}",
                               headers={"referer": "http://testserver/dashboard/keys", CSRF_HEADER: token})
    assert by_referer.status_code == 200 and by_referer.json()["revoked"] is True


def test_a_tenant_admins_session_sees_its_tenant_only_and_labels_as_itself(client: TestClient) -> None:
    admin = new_key(client, tenant="team-a", owner="alice", admin=True)
    new_key(client, tenant="team-b", owner="bob")
    token = sign_in(client, admin["key"])
    assert {k["tenant"] for k in client.get("/admin/keys").json()["data"]} == {"team-a"}
    page = client.get("/dashboard/quality", headers={"accept": "text/html"})
    assert '<meta name="keel-tenant" content="team-a">' in page.text and "alice (team-a)" in page.text
    headers = {**ORIGIN, CSRF_HEADER: token}
    item = client.post("/admin/review", json={"input": "2+2?", "output": "4"}, headers=headers)
    assert item.status_code == 201, item.text
    labelled = client.post(f"/admin/review/{item.json()['id']}/labels", json={"label": "pass"}, headers=headers)
    assert labelled.status_code == 201, labelled.text
    assert [label["reviewer"] for label in labelled.json()["labels"]] == ["alice"]


def test_a_revoked_keys_session_stops_at_once(client: TestClient) -> None:
    admin = new_key(client, tenant="team-a", owner="alice", admin=True)
    sign_in(client, admin["key"])
    assert client.get("/admin/keys").status_code == 200
    revoked = client.delete(f"/admin/keys/{admin['id']}", headers={"authorization": f"Bearer {MASTER}"})
    assert revoked.status_code == 200
    after = client.get("/admin/keys")
    assert after.status_code == 401 and "revoked" in after.json()["error"]["message"]
    assert client.get("/dashboard/keys", headers={"accept": "text/html"}, follow_redirects=False).status_code == 303


def test_signing_out_ends_the_session_and_needs_the_token(client: TestClient) -> None:
    token = sign_in(client, MASTER)
    refused = client.post("/dashboard/logout", data={"csrf": "wrong"}, headers=ORIGIN, follow_redirects=False)
    assert refused.status_code == 403
    out = client.post("/dashboard/logout", data={"csrf": token}, headers=ORIGIN, follow_redirects=False)
    assert out.status_code == 303 and out.headers["set-cookie"].startswith(f"{COOKIE}=;")
    assert "Max-Age=0" in out.headers["set-cookie"]
    assert client.get("/admin/keys").status_code == 401


def test_the_static_assets_are_the_packages_files(client: TestClient) -> None:
    script = client.get("/dashboard/static/vendor/uPlot.iife.min.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/dashboard/static/js/main.js").status_code == 200
    assert client.get("/dashboard/static/vendor/uPlot.LICENSE").text.startswith("The MIT License")
