"""What the HTTP providers share: posting to an upstream and reading its JSON, with
transport failures and error answers turned into Keel's precise errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from keel.errors import KeelError, UpstreamConnectionError, UpstreamMalformed
from keel.providers.http_client import (
    ConnectFailed,
    HTTPClientError,
    ProtocolError,
    Response,
    UpstreamClient,
)

ErrorMapper = Callable[[int, str, Mapping[str, str], str], KeelError]


def mid_stream_error(deployment: str) -> Callable[[HTTPClientError], KeelError]:
    """For `Response.parts`: a failure mid-stream as the error the reliability stage acts on."""
    return lambda exc: transport_error(exc, deployment, "dropped the stream")


def transport_error(exc: HTTPClientError, deployment: str, where: str) -> KeelError:
    """A transport failure as the precise (retryable) error the reliability stage acts on."""
    if isinstance(exc, ProtocolError):
        return UpstreamMalformed(f"deployment '{deployment}' {where}: {exc}", deployment=deployment)
    if isinstance(exc, ConnectFailed):
        return UpstreamConnectionError(f"cannot reach deployment '{deployment}': {exc}", deployment=deployment)
    return UpstreamConnectionError(f"deployment '{deployment}' {where}: {exc}", deployment=deployment)


async def post(client: UpstreamClient, path: str, body: bytes, deployment: str, to_error: ErrorMapper) -> Response:
    """The upstream's answer with a 2xx status; an error answer is read and raised as `to_error` maps it."""
    try:
        response = await client.post(path, body)
    except HTTPClientError as exc:
        raise transport_error(exc, deployment, f"failed at {client.url(path)}") from None
    if response.status >= 400:
        try:
            text = await response.text()
        except HTTPClientError:
            text = ""
        finally:
            response.release()
        raise to_error(response.status, text, response.headers, deployment)
    return response


async def read_json(response: Response, deployment: str) -> Any:
    """The whole body, parsed; a dropped connection or a body that is not JSON is the upstream's fault."""
    try:
        raw = await response.read()
    except HTTPClientError as exc:
        raise transport_error(exc, deployment, "failed mid-answer") from None
    finally:
        response.release()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamMalformed(f"deployment '{deployment}' answered with a body that is not JSON",
                                deployment=deployment) from None
