"""Guardrails on a stream, which stays a stream: each choice's content passes through a hold-back
window (`keel.guardrails.holdback.HoldBack`), so a match that spans chunks is seen whole before any
of it is released, and what is released goes through `release` (which may rewrite it, or raise to
end the stream). What is still held when a choice finishes goes out with its finishing chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from keel.guardrails.holdback import HoldBack
from keel.guardrails.pii import Entity

Release = Callable[[str, Sequence[Entity]], str]  # released text and what was found in it → text sent


def through_window(
    make_window: Callable[[], HoldBack], release: Release
) -> Callable[[AsyncIterator[dict[str, Any]]], AsyncIterator[dict[str, Any]]]:
    """A `ChunkStream.wrap` transform that holds each choice's content back in its own window."""

    async def transform(source: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        windows: dict[int, HoldBack] = {}
        last: dict[str, Any] | None = None
        async for chunk in source:
            last = chunk
            for choice in chunk.get("choices") or ():
                index = choice.get("index", 0)
                delta = choice.get("delta") or {}
                content = delta.get("content")
                window = windows.get(index)
                if isinstance(content, str) and content:
                    if window is None:
                        window = windows[index] = make_window()
                    delta["content"] = release(*window.feed(content))
                if choice.get("finish_reason") is not None and window is not None:
                    rest = release(*window.finish())
                    del windows[index]
                    if rest:
                        delta["content"] = (delta.get("content") or "") + rest
                        choice["delta"] = delta
            yield chunk
        # A source that ended without finishing a choice: what is held still goes out, checked.
        for index, window in windows.items():
            rest = release(*window.finish())
            if rest and last is not None:
                yield {**{k: v for k, v in last.items() if k in ("id", "object", "created", "model")},
                       "choices": [{"index": index, "delta": {"content": rest}, "finish_reason": None}]}

    return transform
