"""`keel serve`'s interpreter settings: the heap frozen once start-up is over, a short GIL switch interval."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from keel.server.runtime import SWITCH_INTERVAL_S, FrozenAfterStartup, tune_interpreter


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class LifespanApp:
    """An ASGI app that completes its start-up at once and records what it was handed otherwise."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await send({"type": "lifespan.startup.complete"})
        else:
            self.calls.append((scope, receive, send))


async def test_the_heap_is_frozen_after_settling_and_before_the_server_hears_startup_is_complete(
    unfrozen: None,
) -> None:
    made_while_settling: list[list[int]] = []
    frozen_when: dict[str, int] = {}

    def settle() -> None:
        frozen_when["settling"] = gc.get_freeze_count()
        made_while_settling.append([1, 2, 3])  # a tracked object, like a module imported by a migration

    async def server_send(message: dict[str, Any]) -> None:
        frozen_when[message["type"]] = gc.get_freeze_count()

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    await FrozenAfterStartup(LifespanApp(), settle)({"type": "lifespan"}, receive, server_send)

    assert frozen_when["settling"] == 0
    assert frozen_when["lifespan.startup.complete"] > 0
    # Frozen objects are out of every generation a collection walks.
    assert not any(obj is made_while_settling[0] for obj in gc.get_objects())


async def test_requests_reach_the_app_untouched() -> None:
    app = LifespanApp()
    settled: list[bool] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "path": "/v1/chat/completions"}
    await FrozenAfterStartup(app, lambda: settled.append(True))(scope, receive, send)

    assert app.calls == [(scope, receive, send)]
    assert settled == []  # only start-up settles


def test_serving_hands_the_gil_over_within_a_millisecond() -> None:
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        tune_interpreter()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
        assert SWITCH_INTERVAL_S <= 0.001
    finally:
        sys.setswitchinterval(before)
