"""Any OpenAI-compatible HTTP server (OpenAI, Azure-style proxies, vLLM, llama.cpp server,
another Keel) over one pool of keep-alive connections per deployment (`http_client`).

Upstream failures become precise errors: the reliability stage retries what is worth it
(429 honouring Retry-After, 5xx, timeouts, resets) and never a bad request.
"""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from keel.config import OpenAIDeployment
from keel.errors import (
    ContextLengthExceeded,
    KeelError,
    UpstreamAuthFailed,
    UpstreamBadRequest,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamTimeout,
)
from keel.pipeline import Call, ChunkStream, Completion, Reply
from keel.providers.http import Upstream, mid_stream_error, read_json
from keel.providers.http_client import Response
from keel.providers.sse import read_events
from keel.types import ChatRequest, EmbeddingRequest


class OpenAICompatProvider:
    def __init__(self, config: OpenAIDeployment, name: str) -> None:
        self.config = config
        self.name = name
        self.base_url = config.base_url.rstrip("/")
        headers = {"content-type": "application/json", **config.headers}
        if config.api_key_env and (key := os.environ.get(config.api_key_env)):
            headers["authorization"] = f"Bearer {key}"
        self.upstream = Upstream(config, self.base_url, headers, name, upstream_error)

    async def start(self) -> None:
        """Nothing to open: connections are made as calls need them."""

    async def close(self) -> None:
        await self.upstream.close()

    def _body(self, request: ChatRequest | EmbeddingRequest) -> bytes:
        body = request.model_dump(exclude_unset=True, by_alias=True)
        body["model"] = self.config.model
        if body.get("stream"):
            # Cost is computed from the upstream's own usage, streams included; the client sees
            # the usage chunk only if it asked (ChunkStream.hide_usage).
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps(body)

    async def chat(self, request: ChatRequest, call: Call) -> Reply:
        response = await self._post("/chat/completions", self._body(request))
        if not request.stream:
            return Completion(await self._json(response))
        return ChunkStream(self._chunks(response))

    async def embed(self, request: EmbeddingRequest, call: Call) -> Reply:
        response = await self._post("/embeddings", self._body(request))
        return Completion(await self._json(response))

    async def _post(self, path: str, body: bytes) -> Response:
        return await self.upstream.post(path, body)

    async def _json(self, response: Response) -> dict[str, Any]:
        body = await read_json(response, self.name)
        if not isinstance(body, dict) or ("choices" not in body and "data" not in body):
            raise UpstreamMalformed(
                f"deployment '{self.name}' answered with JSON that is not a completion", deployment=self.name
            )
        return body

    async def _chunks(self, response: Response) -> AsyncIterator[dict[str, Any]]:
        done = False
        try:
            async for event in read_events(response.parts(mid_stream_error(self.name))):
                if event.data == b"[DONE]":
                    done = True
                    break
                try:
                    chunk = orjson.loads(event.data)
                except orjson.JSONDecodeError:
                    raise UpstreamMalformed(
                        f"deployment '{self.name}' sent a stream event that is not JSON", deployment=self.name
                    ) from None
                if isinstance(chunk, dict) and "error" in chunk:
                    error = chunk["error"] if isinstance(chunk["error"], dict) else {}
                    raise UpstreamServerError(
                        f"deployment '{self.name}' failed mid-stream: "
                        f"{self.upstream.scrubbed(str(error.get('message', chunk['error'])))}",
                        deployment=self.name,
                    )
                yield chunk
        finally:
            # After [DONE] the body may still be ending (the last chunk of a chunked body): the
            # connection is reused only if it has, else closed.
            response.release() if done else response.close()
        if not done:
            raise UpstreamConnectionError(
                f"deployment '{self.name}' ended the stream before it finished (no [DONE])", deployment=self.name
            )


def upstream_error(status: int, text: str, headers: Any, deployment: str) -> KeelError:
    """The precise error for an upstream's HTTP error answer."""
    message, code = _error_message(text)
    where = f"deployment '{deployment}' answered {status}"
    if status == 429:
        return UpstreamRateLimited(f"{where}: {message}", retry_after=retry_after(headers), deployment=deployment)
    if status in (408, 504):
        return UpstreamTimeout(f"{where}: {message}", deployment=deployment)
    if status in (401, 403):
        return UpstreamAuthFailed(
            f"{where}: its API key was refused; check the deployment's api_key_env", deployment=deployment
        )
    if 400 <= status < 500:
        if code == "context_length_exceeded" or "context length" in message or "context_length" in message:
            return ContextLengthExceeded(f"{where}: {message}", deployment=deployment)
        return UpstreamBadRequest(f"{where}: {message}", deployment=deployment)
    if status >= 500:
        return UpstreamServerError(f"{where}: {message}", upstream_status=status, deployment=deployment)
    return UpstreamError(f"{where}: {message}", deployment=deployment)


def _error_message(text: str) -> tuple[str, str | None]:
    try:
        body = orjson.loads(text)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            return str(error.get("message") or text[:500]), error.get("code")
        if isinstance(error, str):
            return error, None
    except orjson.JSONDecodeError:
        pass
    return (text[:500] or "no message"), None


def retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, `retry-after` (seconds or an HTTP date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
