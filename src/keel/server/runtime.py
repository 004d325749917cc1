"""Interpreter settings for the gateway process (`keel serve`): what keeps its tail short under load.

Two stalls were measured in the gateway at saturation (bench/tail_probe.py; figures in
docs/gateway.md#speed), and both are settings of the interpreter, not of Keel's code:

- Full garbage collections. After start-up ~125,000 objects are alive (FastAPI, pydantic,
  SQLAlchemy, Alembic, the config) and every full collection walked them all: 70-90 ms of CPU each,
  several times a minute, with every connection waiting. None of them is ever garbage, so once
  start-up is over they are frozen (`gc.freeze()`): a full collection then walks only what was made
  since, ~2 ms.
- The GIL, between the event loop and the request log's writer thread. When the loop wants the
  GIL back while the writer is busy in Python (redaction, rows), it waits for the switch interval
  (5 ms by default) before the writer must let go, and a request needs it back several times. At
  1 ms the loop's wait is a fifth as long; the writer's work is the same, in shorter slices.

Only `keel serve` applies them: the library runs inside someone else's process, whose settings
are its owner's to choose.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SWITCH_INTERVAL_S = 0.001


def tune_interpreter() -> None:
    """Settings that hold from the start: the GIL's switch interval."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def freeze_heap() -> None:
    """Leave everything alive now out of every later collection (start-up garbage first collected)."""
    gc.collect()
    gc.freeze()


class FrozenAfterStartup:
    """The app, with the heap frozen once its start-up is over and before it says it is ready.

    `settle` runs first, in a thread: whatever start-up goes on after the lifespan's (the request
    log writer creating its schema, say) is waited for, so its objects are frozen too.
    """

    def __init__(self, app: ASGIApp, settle: Callable[[], object]) -> None:
        self.app = app
        self.settle = settle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_when_settled(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await asyncio.to_thread(self.settle)
                freeze_heap()
            await send(message)

        await self.app(scope, receive, send_when_settled)
