"""The exact cache's key: a hash of everything in a request that determines its answer, scoped by tenant.

Fields that only change how the answer is delivered or labelled (`stream`, `stream_options`, `user`,
`metadata`) are left out, so a streamed and a plain request share their answer. Everything else is in,
including fields Keel does not know (an open request passes them upstream, where they may matter).
"""

from __future__ import annotations

import hashlib

import orjson

from keel.types import ChatRequest

# Bump when what is hashed changes, so old entries are never read as new ones.
KEY_VERSION = "v1"
_DELIVERY_ONLY = frozenset({"stream", "stream_options", "user", "metadata"})


def cache_key(request: ChatRequest, tenant: str | None) -> str:
    """`v1:<sha256>` of the request's answer-determining fields and the caller's tenant."""
    fields = request.model_dump(mode="json", exclude_none=True, exclude=set(_DELIVERY_ONLY))
    scoped = orjson.dumps({"tenant": tenant, "request": fields}, option=orjson.OPT_SORT_KEYS)
    return f"{KEY_VERSION}:{hashlib.sha256(scoped).hexdigest()}"
