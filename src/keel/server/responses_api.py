"""POST /v1/responses: being built (issue 13)."""

from __future__ import annotations

from fastapi import APIRouter

from keel.errors import NotSupported
from keel.server.calls import Served
from keel.server.gateway import Answer, EventStream, Incoming


async def create(served: Served, incoming: Incoming) -> Answer | EventStream:
    raise NotSupported("/v1/responses is not served yet.")


stored = APIRouter()
