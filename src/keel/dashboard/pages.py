"""The dashboard's pages: the login form, the session's start and end, and one HTML shell per page
(Overview, Cost, Requests, Traces, Quality, Keys) whose plain JS modules fetch their figures from
the dashboard's JSON API and the admin API. Assets are files of this package, served by the gateway
(`static_files`): no CDN, no build step at run time.

    api.include_router(dashboard_router())
    api.mount(STATIC_PATH, static_files(), name="dashboard-static")

A page asked for without a valid key answers a browser (Accept: text/html) with a redirect to the
login form and any other client with 401 in OpenAI's error shape.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from keel.auth.keys import Credential
from keel.dashboard.auth import (
    COOKIE,
    CrossSiteRequestRefused,
    admin_caller,
    admin_of,
    check_same_origin,
    session_cookie,
    signer_of,
)
from keel.errors import AdminForbidden, AuthenticationFailed, KeelError

HERE = Path(__file__).resolve().parent
STATIC_PATH = "/dashboard/static"
PAGES = {"overview": "Overview", "cost": "Cost", "requests": "Requests", "traces": "Traces",
         "quality": "Quality", "keys": "Keys"}
MAX_LOGIN_BODY = 8192
# What a page may load and do: this gateway's own files and API only; no framing by another site.
HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def static_files() -> StaticFiles:
    return StaticFiles(directory=HERE / "static")


def dashboard_router() -> APIRouter:
    router = APIRouter()

    @router.get("/dashboard", include_in_schema=False)
    async def home() -> Response:
        return RedirectResponse("/dashboard/overview", status_code=303)

    @router.get("/dashboard/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        return login_page(next_page(request.query_params.get("next")))

    @router.post("/dashboard/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await form_of(request)
        target = next_page(form.get("next"))
        try:
            check_same_origin(request)  # no signing a victim in from another site (login CSRF)
            credential = Credential.of("Bearer " + form.get("key", "").strip())
            await admin_of(request.app.state.keel, credential)
        except KeelError as exc:
            return login_page(target, exc.message, exc.status)
        assert credential.digest is not None
        signer = signer_of(request)
        cookie, _ = signer.issue(credential.digest)
        answer = RedirectResponse(target, status_code=303)
        answer.headers["set-cookie"] = session_cookie(request, cookie, signer.ttl_s)
        return answer

    @router.post("/dashboard/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        form = await form_of(request)
        session = signer_of(request).read(request.cookies.get(COOKIE))
        try:
            check_same_origin(request)
            if session is None or form.get("csrf") != session.csrf:
                raise CrossSiteRequestRefused("Sign out from the dashboard's own button (its form carries the token).")
        except KeelError as exc:
            return error_response(exc)
        answer = RedirectResponse("/dashboard/login", status_code=303)
        answer.headers["set-cookie"] = session_cookie(request, "", 0)
        return answer

    for name in PAGES:
        router.add_api_route(f"/dashboard/{name}", page_route(name), methods=["GET"], include_in_schema=False)
    return router


def page_route(name: str) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint of one page: its shell for an admin, the login form (or 401) for anyone else."""

    async def page(request: Request) -> Response:
        try:
            key = await admin_caller(request)
        except (AuthenticationFailed, AdminForbidden) as exc:
            if "text/html" not in request.headers.get("accept", ""):
                return error_response(exc)
            if isinstance(exc, AdminForbidden):
                return login_page(request.url.path, exc.message, exc.status)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/dashboard/login?next={quote(target, safe='')}", status_code=303)
        session = getattr(request.state, "session", None)
        who = "master key" if key is None else f"{key.owner or key.id} ({key.tenant})"
        body = template("shell.html").format_map({
            "page": name, "title": PAGES[name], "who": html.escape(who),
            "tenant": html.escape(key.tenant if key is not None else ""),
            "csrf": html.escape(session.csrf if session is not None else ""),
            "static": STATIC_PATH,
        })
        return HTMLResponse(body, headers=HEADERS)

    page.__name__ = f"dashboard_{name}"
    return page


def login_page(target: str, error: str | None = None, status: int = 200) -> Response:
    message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = template("login.html").format_map({"next": html.escape(target), "error": message, "static": STATIC_PATH})
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def next_page(asked: str | None) -> str:
    """Where to go after signing in: a dashboard page of this gateway, never another site."""
    if asked:
        parts = urlsplit(asked)
        if not parts.scheme and not parts.netloc and parts.path.startswith("/dashboard/") and "\\" not in asked:
            return asked
    return "/dashboard/overview"


async def form_of(request: Request) -> dict[str, str]:
    """A small urlencoded form (the login's, the logout's): its fields, first value each."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            return {}
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def error_response(exc: KeelError) -> Response:
    # OpenAI's error shape, as the gateway's handler answers it (this module stays free of keel.server).
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


@cache
def template(name: str) -> str:
    return (HERE / "templates" / name).read_text(encoding="utf-8")
