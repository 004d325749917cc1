"""Shared fixtures: fake upstreams and a real `keel serve` process."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from keel.config import parse_config
from keel.engine import Keel
from keel.observability.record import RequestRecord, SpanRecord
from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

# Public data the tests read (OpenAI's spec, recorded streams), kept in the repository: tests/data/README.md.
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in a directory of its own: the default request log (keel.db) and its
    spool file land there, not in the checkout, and no test reads another's records."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fake_upstream() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FakeBehaviour()) as server:
        yield server


class GatewayProcess:
    """`keel serve` in a child process, as a user runs it."""

    def __init__(
        self, config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None, args: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.args = args or []  # more of `keel serve`'s options: ["--workers", "2"]
        self.config_path = tmp / f"keel-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / f"keel-{self.port}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> GatewayProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keel.cli", "serve", "--config", str(self.config_path),
             "--port", str(self.port), "--log-level", "info", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keel serve exited early:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"keel serve did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start `keel serve` with a config dict: `gw = gateway({"models": [...]})`."""
    started: list[GatewayProcess] = []

    def start(
        config: dict[str, Any], env: dict[str, str] | None = None, args: list[str] | None = None,
    ) -> GatewayProcess:
        process = GatewayProcess(config, tmp_path, env, args).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def require_service(name: str, reason: str) -> None:
    """Skip when a service is missing, unless CI said services are required."""
    if os.environ.get("KEEL_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{name} is required in CI (KEEL_REQUIRE_SERVICES=1) but {reason}")
    pytest.skip(f"{name} not available: {reason}")


PG_ADMIN_URL = os.environ.get("KEEL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def fresh_pg_database(prefix: str = "keel_e2e") -> Iterator[str]:
    """A database of its own on the real PostgreSQL (`<prefix>_<random>`), dropped afterwards.
    Skips locally when PostgreSQL is not running; fails in CI (KEEL_REQUIRE_SERVICES=1)."""
    import psycopg

    admin = make_url(PG_ADMIN_URL)
    try:
        conn = psycopg.connect(PG_ADMIN_URL, connect_timeout=3, autocommit=True)
    except psycopg.Error as exc:
        require_service("postgres", f"cannot connect to {admin.host}:{admin.port or 5432}: {exc}")
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


REDIS_URL = os.environ.get("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own; every key under it is deleted afterwards."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        client.ping()
    except redis.RedisError as exc:
        require_service("redis", f"{REDIS_URL} did not answer ({exc})")
    name = f"keel-test:{uuid.uuid4().hex[:12]}"
    yield name
    keys = list(client.scan_iter(match=name + ":*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


class RecordingSink:
    """A request-log sink that keeps what it is given, for tests of the observe stage and tracing."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.spans: list[SpanRecord] = []

    def submit(self, record: RequestRecord) -> None:
        self.records.append(record)
        # A call's own spans ride in its record (one row per call in the store).
        self.spans.extend(SpanRecord(**span) for span in record.spans)

    def submit_span(self, span: SpanRecord) -> None:
        self.spans.append(span)

    def only(self) -> RequestRecord:
        assert len(self.records) == 1, self.records
        return self.records[0]

    def span(self, name: str) -> SpanRecord:
        found = [s for s in self.spans if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans]
        return found[0]


@pytest.fixture
async def keel_for() -> AsyncIterator[Callable[..., Keel]]:
    """A `Keel` for one model named "m" over the given deployments, closed after the test."""
    made: list[Keel] = []

    def make(*deployments: dict[str, Any], **model: Any) -> Keel:
        config = parse_config({"models": [{"name": "m", "deployments": list(deployments), **model}]})
        keel = Keel(config)
        made.append(keel)
        return keel

    yield make
    for keel in made:
        await keel.close()
