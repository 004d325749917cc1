"""Who may use the dashboard and the admin API: the master key or an admin key, sent as
`Authorization: Bearer <key>` (scripts) or held in a signed session cookie (browsers, after the
login form). One check for both (`admin_caller`), used by the gateway's `admin_key` dependency, so
the admin API (/admin/keys, /admin/review, /admin/budgets) and the dashboard's JSON API answer a
signed-in browser exactly as they answer a script.

The session cookie is stateless: `v1.<payload>.<signature>`, the payload holding the SHA-256 of the
key signed in with (never the key), a random nonce and an expiry; the signature is an HMAC whose
secret is derived from the gateway's master key and that digest. Every worker process and replica
with the same config reads every other's cookies, and nothing is kept in memory. Each request
identifies the key again (through the auth stage's lookup, as a bearer key is), so a revoked or
expired key's session stops working with the key.

Cookies are sent by browsers on their own, so a request authenticated by cookie with an unsafe
method (POST, PUT, PATCH, DELETE) must also come from the gateway's own origin (`Origin`, or
`Referer` when a browser sends no Origin) and carry the session's CSRF token in `x-keel-csrf`; the
cookie is SameSite=Strict and HttpOnly besides.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from fastapi import Request

from keel.auth.keys import Credential, VirtualKey, digest
from keel.errors import AdminForbidden, AuthenticationFailed

if TYPE_CHECKING:  # keel.server imports this module: the gateway's `Served` is read from the app's state
    from keel.server.calls import Served

COOKIE = "keel_session"
CSRF_HEADER = "x-keel-csrf"
SESSION_TTL_S = 12 * 3600.0
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CONTEXT = b"keel.dashboard.session.v1"


class CrossSiteRequestRefused(AdminForbidden):
    """An unsafe request carried the session cookie but not the proof that the dashboard sent it."""

    code = "csrf_failed"


@dataclass(frozen=True, slots=True)
class Session:
    key_digest: str  # the SHA-256 of the key signed in with: what the auth stage looks keys up by
    nonce: str
    expires_at: float
    csrf: str  # the token unsafe requests must echo in `x-keel-csrf`


class SessionSigner:
    """Issues and reads session cookies; any process holding the same master key reads any other's."""

    def __init__(self, master_key: str | None, clock: Callable[[], float] = time.time,
                 ttl_s: float = SESSION_TTL_S) -> None:
        self._root = hmac.new(_CONTEXT, (master_key or "").encode(), hashlib.sha256).digest()
        self.clock = clock
        self.ttl_s = ttl_s

    def issue(self, key_digest: str) -> tuple[str, Session]:
        """A new session for the key whose digest is given: the cookie's value and the session."""
        payload = {"d": key_digest, "n": secrets.token_urlsafe(16), "e": round(self.clock() + self.ttl_s)}
        body = _b64(orjson.dumps(payload))
        cookie = f"v1.{body}.{_b64(self._sign(key_digest, body.encode()))}"
        return cookie, self._session(payload)

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie holds; None when it is missing, altered, signed with another secret or expired."""
        if not cookie:
            return None
        version, _, rest = cookie.partition(".")
        body, _, signature = rest.partition(".")
        if version != "v1" or not body or not signature:
            return None
        try:
            payload = orjson.loads(_unb64(body))
            key_digest, expires = payload["d"], payload["e"]
            if not isinstance(key_digest, str) or not isinstance(payload["n"], str):
                return None
            given = _unb64(signature)
        except (ValueError, KeyError, TypeError):
            return None
        if not hmac.compare_digest(given, self._sign(key_digest, body.encode())):
            return None
        if not isinstance(expires, int | float) or expires <= self.clock():
            return None
        return self._session(payload)

    def _session(self, payload: dict[str, Any]) -> Session:
        token = _b64(hmac.new(self._key(payload["d"]), b"csrf:" + payload["n"].encode(), hashlib.sha256).digest())
        return Session(payload["d"], payload["n"], float(payload["e"]), token)

    def _key(self, key_digest: str) -> bytes:
        # Per key: a session is bound to the key it was made for, and to this gateway's master key.
        return hmac.new(self._root, key_digest.encode(), hashlib.sha256).digest()

    def _sign(self, key_digest: str, body: bytes) -> bytes:
        return hmac.new(self._key(key_digest), b"session:" + body, hashlib.sha256).digest()


def signer_of(request: Request) -> SessionSigner:
    signer: SessionSigner = request.app.state.dashboard_sessions
    return signer


async def admin_of(served: Served, credential: Credential) -> VirtualKey | None:
    """The admin behind a credential: a tenant admin key, or None for the master key. Raises
    AuthenticationFailed (no key, unknown, revoked, expired) or AdminForbidden (a key for models only)."""
    auth = served.keel.auth
    if auth is not None:
        key = await auth.identify(credential)
        if key is not None and not key.admin:
            raise AdminForbidden(
                f"The key {key.id} may call models but not the admin API; use a tenant admin key or the master key."
            )
        return key
    if served.master_key is None:
        raise AuthenticationFailed(
            f"The admin API needs the gateway's key: set {served.master_key_env} and send "
            "'Authorization: Bearer <key>'."
        )
    if not credential.matches(digest(served.master_key)):
        raise AuthenticationFailed(
            "Invalid or missing API key. Send 'Authorization: Bearer <key>' with the gateway's key."
        )
    return None


async def admin_caller(request: Request) -> VirtualKey | None:
    """Check the caller of an admin or dashboard route (bearer key first, else the session cookie) and
    leave its key in `request.state.admin` and its tenant in `request.state.tenant` (None: the master
    key, every tenant)."""
    served: Served = request.app.state.keel
    request.state.tenant = None
    authorization = request.headers.get("authorization")
    session = None if authorization else signer_of(request).read(request.cookies.get(COOKIE))
    if session is None:
        if not authorization and (served.keel.auth is not None or served.master_key is not None):
            raise AuthenticationFailed(_SIGN_IN)
        key = await admin_of(served, Credential.of(authorization))
    else:
        key = await admin_of(served, Credential(session.key_digest, True))
        if request.method in UNSAFE_METHODS:
            check_same_origin(request)
            if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), session.csrf):
                raise CrossSiteRequestRefused(
                    f"This request carries the dashboard's session cookie but not its CSRF token (send it in "
                    f"'{CSRF_HEADER}', as the dashboard's pages do), so it is refused; scripts send "
                    "'Authorization: Bearer <key>' instead."
                )
        request.state.session = session
    request.state.admin = key
    request.state.tenant = key.tenant if key is not None else None
    return key


_SIGN_IN = ("No API key was sent. Send 'Authorization: Bearer <key>' with the master key or a tenant admin key, "
            "or sign in to the dashboard at /dashboard/login.")


def check_same_origin(request: Request) -> None:
    """Refuse an unsafe request a browser sent from another site: its Origin (or Referer) must be this host."""
    source = request.headers.get("origin") or request.headers.get("referer")
    host = request.headers.get("host", "")
    seen = urlsplit(source) if source and source != "null" else None
    if seen is None or seen.scheme not in ("http", "https") or not host or seen.netloc.lower() != host.lower():
        raise CrossSiteRequestRefused(
            f"This request carries the dashboard's session cookie but comes from another origin "
            f"({source or 'none given'}, not this gateway's {host or 'host'}), so it is refused."
        )


def session_cookie(request: Request, value: str, max_age: float) -> str:
    """The Set-Cookie header of a session (an empty value and age 0 end it)."""
    secure = "; Secure" if request.url.scheme == "https" else ""
    return f"{COOKIE}={value}; Max-Age={int(max_age)}; Path=/; HttpOnly; SameSite=Strict{secure}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
