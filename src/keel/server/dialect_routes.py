"""The hot routes of the APIs clients speak besides chat: the Responses API, Anthropic's Messages API
and legacy completions. Each is translated at the edge to the one internal call, so every stage applies
whatever the dialect (docs/dialects.md)."""

from __future__ import annotations

from functools import partial

from keel.server import completions_api, messages_api, responses_api
from keel.server.calls import Served
from keel.server.gateway import HotRoute

stored_responses_router = responses_api.stored


def dialect_routes(served: Served) -> dict[str, HotRoute]:
    return {
        "/v1/responses": HotRoute(partial(responses_api.create, served)),
        "/v1/messages": HotRoute(partial(messages_api.create, served), error_body=messages_api.error_body,
                                 id_header=b"request-id"),  # what Anthropic's SDKs read as `_request_id`
        "/v1/completions": HotRoute(partial(completions_api.create, served)),
    }
