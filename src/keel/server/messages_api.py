"""POST /v1/messages: being built (issue 13)."""

from __future__ import annotations

from typing import Any

from keel.errors import KeelError, NotSupported
from keel.server.calls import Served
from keel.server.gateway import Answer, EventStream, Incoming


async def create(served: Served, incoming: Incoming) -> Answer | EventStream:
    raise NotSupported("/v1/messages is not served yet.")


def error_body(exc: KeelError) -> dict[str, Any]:
    return exc.body()
