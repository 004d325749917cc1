"""What the HTTP providers share: posting to an upstream and reading its JSON, with
transport failures and error answers turned into Keel's precise errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from keel.errors import KeelError, UpstreamConnectionError, UpstreamMalformed

ErrorMapper = Callable[[int, str, Mapping[str, str], str], KeelError]


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, deployment: str, to_error: ErrorMapper
) -> aiohttp.ClientResponse:
    """The upstream's answer with a 2xx status; an error answer is read and raised as `to_error` maps it."""
    try:
        response = await session.post(url, data=body)
    except aiohttp.ClientError as exc:
        raise UpstreamConnectionError(f"cannot reach deployment '{deployment}' at {url}: {exc}",
                                      deployment=deployment) from None
    if response.status >= 400:
        try:
            text = await response.text()
        except aiohttp.ClientError:
            text = ""
        finally:
            response.release()
        raise to_error(response.status, text, response.headers, deployment)
    return response


async def read_json(response: aiohttp.ClientResponse, deployment: str) -> Any:
    """The whole body, parsed; a dropped connection or a body that is not JSON is the upstream's fault."""
    try:
        raw = await response.read()
    except aiohttp.ClientError as exc:
        raise UpstreamConnectionError(f"deployment '{deployment}' dropped the connection mid-answer: {exc}",
                                      deployment=deployment) from None
    finally:
        response.release()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamMalformed(f"deployment '{deployment}' answered with a body that is not JSON",
                                deployment=deployment) from None


async def lines_of(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's lines as they arrive. When the connection fails, aiohttp raises at once and
    drops what it had already received; those complete lines are passed on first, so a client
    gets every chunk the upstream sent before the error (a half line is not passed on)."""
    try:
        async for line in content:
            yield line
    except aiohttp.ClientError:
        buffered: Sequence[bytes] = getattr(content, "_buffer", ())
        offset: int = getattr(content, "_buffer_offset", 0)
        leftover = b"".join(buffered)[offset:]
        for line in leftover.splitlines(keepends=True):
            if line.endswith(b"\n"):
                yield line
        raise
