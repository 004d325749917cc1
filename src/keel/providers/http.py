"""What the HTTP providers share: a deployment's connection pools, posting to it and reading its
JSON, with transport failures, redirects and error answers turned into Keel's precise errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

import orjson

from keel.config import HTTPDeployment
from keel.errors import (
    KeelError,
    UpstreamConnectionError,
    UpstreamMalformed,
    UpstreamRedirected,
    UpstreamResponseTooLarge,
)
from keel.providers.http_client import (
    ConnectFailed,
    HTTPClientError,
    ProtocolError,
    ProxyNotSupported,
    Response,
    ResponseTooLarge,
    UpstreamClient,
)

ErrorMapper = Callable[[int, str, Mapping[str, str], str], KeelError]
SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key"})  # OpenAI's, Anthropic's, Azure's
REDACTED = "[redacted]"
MAX_REDIRECTS = 5
FOLLOWED = (307, 308)  # the method and body are kept; 301/302/303 would turn the POST into a GET


def secrets_in(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The credentials among a deployment's headers, whole and without their scheme ("Bearer <key>"),
    longest first."""
    found: set[str] = set()
    for name, value in headers.items():
        if name.lower() in SECRET_HEADERS and value.strip():
            found.add(value)
            scheme, _, credential = value.partition(" ")
            if scheme and credential.strip():
                found.add(credential.strip())
    return tuple(sorted(found, key=len, reverse=True))


def mid_stream_error(deployment: str) -> Callable[[HTTPClientError], KeelError]:
    """For `Response.parts`: a failure mid-stream as the error the reliability stage acts on."""
    return lambda exc: transport_error(exc, deployment, "dropped the stream")


def transport_error(exc: HTTPClientError, deployment: str, where: str) -> KeelError:
    """A transport failure as the precise error the reliability stage acts on."""
    if isinstance(exc, ResponseTooLarge):
        return UpstreamResponseTooLarge(
            f"deployment '{deployment}' {where}: {exc}; raise the deployment's max_response_mb if the answer "
            "is expected", deployment=deployment)
    if isinstance(exc, ProtocolError):
        return UpstreamMalformed(f"deployment '{deployment}' {where}: {exc}", deployment=deployment)
    if isinstance(exc, ConnectFailed):
        return UpstreamConnectionError(f"cannot reach deployment '{deployment}': {exc}", deployment=deployment)
    return UpstreamConnectionError(f"deployment '{deployment}' {where}: {exc}", deployment=deployment)


class Upstream:
    """A deployment's HTTP side: one keep-alive pool to its base URL and, when it follows
    redirects, one to each origin a 307/308 sends it to."""

    def __init__(self, config: HTTPDeployment, base_url: str, headers: Mapping[str, str], deployment: str,
                 to_error: ErrorMapper) -> None:
        self.config = config
        self.headers = dict(headers)
        self.secrets = secrets_in(self.headers)
        self.deployment = deployment
        self.to_error = to_error
        self.base_url = base_url
        self.client = self._client(base_url)  # an unusable proxy in the environment fails here, at start-up
        self._moved: dict[str, UpstreamClient] = {}  # origin -> pool, for followed redirects

    def scrubbed(self, text: str) -> str:
        """`text` from the upstream (an error's body or message) without the deployment's API key, which
        some upstreams echo back ("Incorrect API key provided: ..."): it would reach the client, the log
        and the request log."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def _client(self, base_url: str) -> UpstreamClient:
        try:
            return UpstreamClient(base_url, self.headers, max_connections=self.config.max_connections,
                                  max_response_bytes=int(self.config.max_response_mb * 1024 * 1024))
        except ProxyNotSupported as exc:
            raise ProxyNotSupported(f"deployment '{self.deployment}': {exc}") from None

    async def close(self) -> None:
        """Every connection closed; a later call opens new ones (the library may close and go on)."""
        closed, self.client = self.client, self._client(self.base_url)
        for client in (closed, *self._moved.values()):
            await client.close()
        self._moved.clear()

    async def post(self, path: str, body: bytes) -> Response:
        """The upstream's answer with a 2xx status; an error answer is read and raised as `to_error`
        maps it, a redirect is followed (307/308, when the deployment says so) or raised."""
        client, target = self.client, path
        for hops in range(MAX_REDIRECTS + 1):
            url = client.url(target)
            try:
                response = await client.post(target, body)
            except HTTPClientError as exc:
                raise transport_error(exc, self.deployment, f"failed at {url}") from None
            if response.status < 300:
                return response
            text = await _drain(response)
            if response.status >= 400:
                raise self.to_error(response.status, self.scrubbed(text), response.headers, self.deployment)
            location = response.headers.get("location")
            if not (self.config.follow_redirects and response.status in FOLLOWED and location
                    and hops < MAX_REDIRECTS):
                raise self._redirected(response.status, url, location, hops)
            client, target = self._follow(urljoin(url, location))
        raise AssertionError("unreachable")

    def _follow(self, url: str) -> tuple[UpstreamClient, str]:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self._moved:
            self._moved[origin] = self._client(origin)
        return self._moved[origin], parts.path + (f"?{parts.query}" if parts.query else "")

    def _redirected(self, status: int, url: str, location: str | None, hops: int) -> UpstreamRedirected:
        where = f"deployment '{self.deployment}' answered {status} at {url}"
        if location is None:
            return UpstreamRedirected(f"{where} with no Location", deployment=self.deployment)
        if hops == MAX_REDIRECTS:
            advice = f"more than {MAX_REDIRECTS} redirects in a row"
        elif self.config.follow_redirects:
            advice = f"only 307/308 keep the POST; set base_url to the new address ({location})"
        else:
            advice = "set the deployment's base_url to the new address, or follow_redirects: true"
        return UpstreamRedirected(f"{where}, redirecting to {location}: {advice}", deployment=self.deployment)


async def _drain(response: Response) -> str:
    """An error or redirect answer's text (its connection back to the pool when it was read)."""
    try:
        return await response.text()
    except HTTPClientError:
        return ""
    finally:
        response.release()


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
