"""A real PostgreSQL with pgvector for tests, started by `pgserver` (PostgreSQL 16 and pgvector 0.6
in a wheel): the Debian PostgreSQL of CI has no pgvector.

Use it as a plugin from a test module (tests/ is on sys.path, as for `conftest`):

    from pgvector_server import pgvector_url  # noqa: F401

`pgvector_url` (session) is a postgresql:// URL of a database of its own, dropped at the end;
`pgvector_database` (per test, imported alike) a database of the test's own, for tests whose stores
have fixed table names; `pgvector_server` (session) also stops and starts the server, for outage tests
(a test that stopped it gets it started again by `pgvector_database`). Tests
sharing the session keep apart by table prefix. When pgserver cannot start, tests skip locally and fail
in CI (KEEL_REQUIRE_SERVICES=1).

As root (here and in CI) PostgreSQL refuses to run: pgserver then runs it as a system user `pgserver`
(created with useradd) and opens the directories above the data directory to it (chmod o+rx).
It listens on a Unix socket in the data directory only, never on a TCP port.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_service


class PgvectorServer:
    """The pgserver instance, which a test may stop (an outage) and start again (same URL)."""

    def __init__(self, data: Path) -> None:
        import pgserver

        self.server: Any = pgserver.get_server(data, cleanup_mode="delete")

    def uri(self, database: str) -> str:
        return str(self.server.get_uri(database=database))

    def stop(self) -> None:
        """Stop PostgreSQL now (fast shutdown: sessions are ended), waiting until it is down."""
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        """Start it again, waiting until it accepts connections."""
        self.server.ensure_postgres_running()

    def close(self) -> None:
        self.server.cleanup()


@pytest.fixture(scope="session")
def pgvector_server() -> Iterator[PgvectorServer]:
    # Not under pytest's base temp: each pytest session makes /tmp/pytest-of-<user> 0700 again, which
    # locks the `pgserver` user out of a server it already runs (pg_ctl stop then fails).
    home = Path(tempfile.mkdtemp(prefix="keel-pgvector-"))
    try:
        server = PgvectorServer(home / "data")
    except Exception as exc:  # ImportError, or the server that did not start
        shutil.rmtree(home, ignore_errors=True)
        require_service("pgvector", f"pgserver could not start PostgreSQL with pgvector: {exc}")
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def pgvector_url(pgvector_server: PgvectorServer) -> Iterator[str]:
    import psycopg

    name = f"keel_pgv_{secrets.token_hex(4)}"
    with psycopg.connect(pgvector_server.uri("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield pgvector_server.uri(name)
    try:
        with psycopg.connect(pgvector_server.uri("postgres"), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.OperationalError:
        pass  # a test left the server stopped: it is deleted with its data directory anyway


@pytest.fixture
def pgvector_database(pgvector_server: PgvectorServer) -> Iterator[str]:
    """A database of this test's own on the pgvector server, dropped afterwards; the server is running
    again afterwards even when the test stopped it and failed."""
    import psycopg

    name = f"keel_pgt_{secrets.token_hex(4)}"
    with psycopg.connect(pgvector_server.uri("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield pgvector_server.uri(name)
    pgvector_server.start()
    with psycopg.connect(pgvector_server.uri("postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
