"""Acceptance: who may see the dashboard, in real headless Chromium over a real `keel serve`.

Without a key a browser lands on the login form and a script gets 401; a wrong key does not sign in;
a tenant's admin sees its own tenant's figures, calls and keys only; a form posted from another
origin with the session cookie is refused (csrf_failed) and changes nothing; revoking a key ends the
sessions signed in with it."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dashboard_helpers import MASTER, Site, browser, ready, signed_in, site

__all__ = ["browser", "site"]  # the fixtures, used by name


def test_without_a_key_the_browser_gets_the_login_form_and_a_script_401(browser: Any, site: Site) -> None:
    page = browser.new_context().new_page()
    try:
        page.goto(f"{site.url}/dashboard/cost?range=24h")
        page.wait_for_url("**/dashboard/login?next=%2Fdashboard%2Fcost%3Frange%3D24h")
        assert page.is_visible("form#login")
        page.fill("#key", "sk-keel-" + "x" * 43)
        page.click("button[type=submit]")
        page.wait_for_selector("form#login .error")
        assert "not known" in page.inner_text("form#login .error")
        assert page.context.cookies() == []
        page.screenshot(path=str(site.shots / "login-refused.png"))
    finally:
        page.context.close()
    for path in ("/dashboard/overview", "/dashboard/api/overview", "/dashboard/api/requests", "/admin/keys"):
        answer = httpx.get(site.url + path, timeout=10)
        assert answer.status_code == 401, path
        assert answer.json()["error"]["code"] == "invalid_api_key"


def test_a_tenant_admin_sees_only_its_tenant(browser: Any, site: Site) -> None:
    page = signed_in(browser, site, key=site.keys["alice"])
    try:
        mine = site.figures(tenant="team-a")
        assert mine.requests == 13 and site.figures().requests == 16
        assert page.inner_text("[data-total=requests] .figure") == str(mine.requests)
        assert float(page.get_attribute("[data-total=cost_usd] .figure", "data-value") or "nan") == pytest.approx(
            mine.cost_usd, rel=1e-9)

        page.goto(f"{site.url}/dashboard/requests?{site.window_query()}")
        ready(page)
        shown = {row.get_attribute("data-request") for row in page.query_selector_all("#requests tbody tr")}
        assert shown == {r["request_id"] for r in site.records() if r["tenant"] == "team-a"}
        other = site.request_ids["team-b-0"]
        page.goto(f"{site.url}/dashboard/requests?{site.window_query()}&id={other}")
        ready(page)
        page.wait_for_selector("#request-detail .problem")
        assert "Team b asks" not in page.inner_text("main")

        page.goto(f"{site.url}/dashboard/keys")
        ready(page)
        page.wait_for_selector("#keys tbody tr[data-key]")
        tenants = {cell.inner_text() for cell in page.query_selector_all("#keys tbody tr td:nth-child(2)")}
        assert tenants == {"team-a"}
        page.screenshot(path=str(site.shots / "keys-team-a.png"), full_page=True)
    finally:
        page.context.close()


@pytest.fixture
def other_origin(tmp_path: Path, site: Site) -> Iterator[str]:
    """A page on another origin (another port of this host: same site, so the SameSite=Strict cookie
    still rides along and the Origin check is what refuses) that posts a new key to the gateway."""
    (tmp_path / "evil.html").write_text(
        f'<form id="f" method="post" action="{site.url}/admin/keys" enctype="text/plain">'
        '<input name=\'{"tenant": "team-a", "owner": "mallory", "admin": true, "x": "\' value=\'"}\'>'
        '</form><script>document.getElementById("f").submit()</script>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/evil.html"
    server.shutdown()
    server.server_close()


def test_a_form_posted_from_another_origin_is_refused(browser: Any, site: Site, other_origin: str) -> None:
    page = signed_in(browser, site, key=MASTER)
    try:
        page.goto(other_origin)
        page.wait_for_url(f"{site.url}/admin/keys")
        body = page.inner_text("body")
        assert "csrf_failed" in body and "another origin" in body
        page.screenshot(path=str(site.shots / "csrf-refused.png"))
    finally:
        page.context.close()
    owners = [k["owner"] for k in site.admin().get("/admin/keys").json()["data"]]
    assert "mallory" not in owners


def test_a_revoked_keys_browser_session_ends(browser: Any, site: Site) -> None:
    made = site.admin().post("/admin/keys", json={"tenant": "team-a", "owner": "frank", "admin": True}).json()
    page = signed_in(browser, site, key=made["key"])
    try:
        assert site.admin().delete(f"/admin/keys/{made['id']}").status_code == 200
        page.goto(f"{site.url}/dashboard/keys")
        page.wait_for_url("**/dashboard/login?next=%2Fdashboard%2Fkeys")
        assert page.is_visible("form#login")
    finally:
        page.context.close()
