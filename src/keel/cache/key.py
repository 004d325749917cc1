"""The exact cache's key: a hash of everything in a request that determines its answer, scoped by tenant.

Fields that only change how the answer is delivered or labelled (`stream`, `stream_options`, `user`,
`metadata`) are left out, so a streamed and a plain request share their answer. Everything else is in,
including fields Keel does not know (an open request passes them upstream, where they may matter).

The key reads `v2:<tenant>:<model>:<sha256>`, so entries can be found by tenant and model (invalidation,
`KeyScope`). Tenant and model are percent-encoded: a segment never holds a ':' nor a Redis glob character,
so a prefix or pattern of one tenant or model can never reach into another's. No tenant is `-`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from keel.types import ChatRequest

# Bump when what is hashed or the layout changes, so old entries are never read as new ones.
KEY_VERSION = "v2"
NO_TENANT = "-"
DELIVERY_ONLY = frozenset({"stream", "stream_options", "user", "metadata"})


def cache_key(request: ChatRequest, tenant: str | None) -> str:
    """`v2:<tenant>:<model>:<sha256>` of the request's answer-determining fields and the caller's tenant."""
    return scoped_key(KEY_VERSION, answer_fields(request), request.model, tenant)


def answer_fields(request: ChatRequest) -> dict[str, Any]:
    """The request's fields that determine its answer, as JSON values (the delivery-only ones left out)."""
    return request.model_dump(mode="json", exclude_none=True, exclude=set(DELIVERY_ONLY))


def scoped_key(version: str, fields: dict[str, Any], model: str, tenant: str | None) -> str:
    """`<version>:<tenant>:<model>:<sha256>` of `fields` and the tenant, serialised with sorted keys."""
    scoped = orjson.dumps({"tenant": tenant, "request": fields}, option=orjson.OPT_SORT_KEYS)
    return f"{version}:{tenant_segment(tenant)}:{segment(model)}:{hashlib.sha256(scoped).hexdigest()}"


def segment(name: str) -> str:
    """`name` as a key segment: only letters, digits and `_.-~` stay; the rest is percent-encoded."""
    encoded = quote(name, safe="")
    return "%2D" if encoded == NO_TENANT else encoded  # a tenant named "-" is not "no tenant"


def tenant_segment(tenant: str | None) -> str:
    return NO_TENANT if tenant is None else segment(tenant)


@dataclass(frozen=True, slots=True)
class KeyScope:
    """Which entries an invalidation reaches: those of `model`, of `tenant`, and under `key_prefix`
    (each one given narrows it; none given: every entry of this key version)."""

    model: str | None = None
    tenant: str | None = None
    key_prefix: str | None = None
    version: str = KEY_VERSION  # the semantic cache's scopes read alike, under their own version

    def matches(self, key: str) -> bool:
        parts = key.split(":", 3)
        if len(parts) != 4 or parts[0] != self.version:
            return False
        if self.tenant is not None and parts[1] != segment(self.tenant):
            return False
        if self.model is not None and parts[2] != segment(self.model):
            return False
        return self.key_prefix is None or key.startswith(self.key_prefix)

    def glob(self) -> str:
        """A Redis MATCH pattern (after the store's own prefix) that takes in every key `matches` takes:
        the store still checks each key with `matches`."""
        if self.key_prefix is not None:
            return glob_escape(self.key_prefix) + "*"
        tenant = segment(self.tenant) if self.tenant is not None else "*"
        model = segment(self.model) if self.model is not None else "*"
        return f"{self.version}:{tenant}:{model}:*"


def glob_escape(text: str) -> str:
    """`text` matched literally by a Redis glob pattern."""
    return "".join("\\" + c if c in "*?[]\\^" else c for c in text)
