"""`keel serve --workers N`: N gateway processes behind one port, on one machine.

uvicorn's own supervisor runs them: the parent binds the port once and hands the listening socket
to each worker (spawned, not forked), pings them, starts a new one in place of any that dies, and on
SIGTERM or SIGINT stops them all, each draining its calls in flight for `server.graceful_timeout_s`.
One shared socket rather than one socket per worker (SO_REUSEPORT): a connection waiting in the
backlog of a worker that dies is taken by another instead of being reset, and the port cannot be
taken over by another process binding it too.

Workers are replicas: what one counts, the others must see. So with more than one, every limit,
budget and cache must live in Redis or PostgreSQL, and start-up refuses in-process ones
(`SharedStateRequired`). The request log may stay in SQLite: one file on one machine, which SQLite
shares between processes itself (WAL; each worker writes a batch at most every
`store.flush_interval_ms`, and a writer waits for another's lock up to 30 s). Each worker spools to a
file of its own, and what a dead worker left there is replayed by the next to start
(keel.observability.writer.Spool). `/metrics` sums the workers (keel.observability.multiprocess).

Each worker builds its own `Keel` from the config file the parent read: `worker_app` is the app
factory uvicorn calls in each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.config import ConfigError, ConfigSource, KeelConfig
from keel.observability.multiprocess import MIRROR_INTERVAL_S, MULTIPROC_ENV, SharedMetrics

if TYPE_CHECKING:
    import uvicorn

CONFIG_ENV = "KEEL_WORKER_CONFIG"  # the config file the parent read; empty: the default config
LOG_LEVEL_ENV = "KEEL_WORKER_LOG_LEVEL"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"


class SharedStateRequired(ConfigError):
    """`--workers` above 1 with a limit, budget or cache kept in one process: each worker would count
    on its own. The message names the keel.yaml keys to set."""

    def __init__(self, workers: int, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"--workers {workers}: every worker is a replica, so what they count must be shared, but "
            + "; ".join(problems)
            + ". Configure Redis/PostgreSQL as said (docs/scale-out.md), or run one worker."
        )


def in_process_state(config: KeelConfig) -> list[str]:
    """What `config` keeps in this process that several workers would each count on their own,
    each said with the keel.yaml keys that move it to Redis or PostgreSQL."""
    from keel.limits.rules import RateRules

    problems: list[str] = []
    if config.limits.backend == "memory" and (RateRules.from_config(config).any or config.auth.virtual_keys):
        problems.append(
            "rate limits are counted in memory (limits.backend: memory): set limits.backend: redis and "
            "limits.redis_url (or state.redis_url)"
        )
    if not config.state.redis_url and (config.budgets or config.auth.virtual_keys):
        why = "budgets are" if config.budgets else "virtual keys' budgets would be"
        problems.append(f"{why} counted in memory (no state.redis_url): set state.redis_url")
    sections = [("cache", config.cache)] + [
        (f"models[{i}].cache", m.cache) for i, m in enumerate(config.models) if m.cache
    ]
    for where, section in sections:
        if not any(config.cache_of(m) is section for m in config.models):
            continue  # every model has a cache section of its own
        if section.exact.enabled and section.backend == "memory":
            problems.append(
                f"{where}.exact is kept in memory ({where}.backend: memory): set {where}.backend: redis "
                f"(with {where}.redis_url or state.redis_url) or postgres"
            )
        if section.semantic.enabled and section.semantic_backend == "memory":
            problems.append(
                f"{where}.semantic is kept in memory: set {where}.semantic.backend: postgres "
                f"(or {where}.backend: postgres) with a PostgreSQL that has pgvector"
            )
    return problems


def require_shared_state(config: KeelConfig, workers: int) -> None:
    """Raise `SharedStateRequired` when several workers would each keep their own counts."""
    if workers > 1 and (problems := in_process_state(config)):
        raise SharedStateRequired(workers, problems)


@contextlib.contextmanager
def metrics_directory() -> Iterator[Path]:
    """A fresh directory for the workers' metric files, named in the environment they inherit,
    deleted afterwards (a directory left from another run would add its counts to this one's)."""
    directory = Path(tempfile.mkdtemp(prefix="keel-metrics-"))
    before = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(directory)
    try:
        yield directory
    finally:
        if before is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = before
        shutil.rmtree(directory, ignore_errors=True)


def run_workers(config: uvicorn.Config, source: ConfigSource) -> bool:
    """Serve with `config.workers` processes until a signal stops them; False when a worker could
    not start (its log says why) and the supervisor gave up."""
    from uvicorn.supervisors.multiprocess import Multiprocess

    class Supervisor(Multiprocess):
        signalled = False

        def handle_int(self) -> None:
            self.stop()
            super().handle_int()

        def handle_term(self) -> None:
            self.stop()
            super().handle_term()

        def stop(self) -> None:
            # The workers close the listening socket as they start draining; the parent's copy of it
            # must go too, or new connections would still be queued, for no one to answer.
            self.signalled = True
            for listening in self.sockets:
                listening.close()

    os.environ[CONFIG_ENV] = str(source.path.absolute()) if source.path else ""
    os.environ[LOG_LEVEL_ENV] = str(config.log_level or "info")
    with metrics_directory():
        sock = config.bind_socket()
        supervisor = Supervisor(config, sockets=[sock])
        try:
            supervisor.run()
        finally:
            sock.close()
    return supervisor.signalled


def worker_app() -> ASGIApp:
    """The app of one worker (uvicorn's factory, called in each worker process)."""
    from keel.config import find_config
    from keel.engine import Keel
    from keel.observability.writer import Spool
    from keel.server.app import create_app
    from keel.server.runtime import FrozenAfterStartup, tune_interpreter

    level = os.environ.get(LOG_LEVEL_ENV, "info")
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=LOG_FORMAT)
    named = os.environ.get(CONFIG_ENV, "")
    source = find_config(named) if named else ConfigSource(None, "default")
    keel = Keel(source.load(warn_unset_keys=False))  # the parent warned once
    keel.writer.spool = Spool.of_worker(keel.config.store.spool_path)  # no lock shared with other workers
    tune_interpreter()
    app: ASGIApp = FrozenAfterStartup(create_app(keel), settle=keel.writer.flush)  # see runtime.py
    if keel.metrics.shared is not None:
        app = MirroredMetrics(app, keel.metrics.shared)
    return app


class MirroredMetrics:
    """The app, with this worker's scrape-time metrics copied to the shared files while it serves."""

    def __init__(self, app: ASGIApp, shared: SharedMetrics) -> None:
        self.app = app
        self.shared = shared
        self.task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_and_mirror(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.task = asyncio.create_task(self.mirror())
            elif message["type"] == "lifespan.shutdown.complete":
                if self.task is not None:
                    self.task.cancel()
                self.shared.mirror()  # the last counts, once the calls in flight are done
                self.shared.close()
            await send(message)

        await self.app(scope, receive, send_and_mirror)

    async def mirror(self) -> None:
        while True:
            await asyncio.sleep(MIRROR_INTERVAL_S)
            try:
                self.shared.mirror()
            except Exception:  # a metric must never stop the worker
                logging.getLogger("keel.metrics").exception("copying this worker's metrics failed")
