"""POST /v1/completions: being built (issue 13)."""

from __future__ import annotations

from keel.errors import NotSupported
from keel.server.calls import Served
from keel.server.gateway import Answer, EventStream, Incoming


async def create(served: Served, incoming: Incoming) -> Answer | EventStream:
    raise NotSupported("/v1/completions is not served yet.")
