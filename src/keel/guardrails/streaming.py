"""Guardrails on a stream, which stays a stream: each streamed text of each choice (its content, and
each tool call's arguments) passes through a hold-back window of its own
(`keel.guardrails.holdback.HoldBack`), so a match that spans chunks is seen whole before any of it
is released, and what is released goes through `release` (which may rewrite it, or raise to end the
stream). What is still held when a choice finishes goes out with its finishing chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from typing import Any

from keel.guardrails.holdback import HoldBack
from keel.guardrails.pii import Entity

Release = Callable[[str, Sequence[Entity]], str]  # released text and what was found in it → text sent
HEAD_FIELDS = ("id", "object", "created", "model")


def through_window(
    make_window: Callable[[], HoldBack], release: Release
) -> Callable[[AsyncIterator[dict[str, Any]]], AsyncIterator[dict[str, Any]]]:
    """A `ChunkStream.wrap` transform that holds each streamed text back in its own window."""

    async def transform(source: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        windows: dict[tuple[int, Hashable], HoldBack] = {}  # by choice index and text (content, a tool call)
        last: dict[str, Any] | None = None
        async for chunk in source:
            last = chunk
            for choice in chunk.get("choices") or ():
                index = choice.get("index", 0)
                delta = choice.get("delta") or {}
                for key, holder, field in texts_of(delta):
                    if holder[field]:
                        window = windows.get((index, key))
                        if window is None:
                            window = windows[(index, key)] = make_window()
                        holder[field] = release(*window.feed(holder[field]))
                if choice.get("finish_reason") is not None:
                    for key in [k for i, k in windows if i == index]:
                        rest = release(*windows.pop((index, key)).finish())
                        if rest:
                            _append(delta, key, rest)
                            choice["delta"] = delta
            yield chunk
        # A source that ended without finishing a choice: what is held still goes out, checked.
        for (index, key), window in windows.items():
            rest = release(*window.finish())
            if rest and last is not None:
                tail: dict[str, Any] = {}
                _append(tail, key, rest)
                yield {**{k: v for k, v in last.items() if k in HEAD_FIELDS},
                       "choices": [{"index": index, "delta": tail, "finish_reason": None}]}

    return transform


def texts_of(part: dict[str, Any]) -> list[tuple[Hashable, dict[str, Any], str]]:
    """The texts of a message or a stream's delta (its content, each tool call's arguments), as (key,
    the dict holding it, its field)."""
    found: list[tuple[Hashable, dict[str, Any], str]] = []
    if isinstance(part.get("content"), str):
        found.append(("content", part, "content"))
    for call in part.get("tool_calls") or ():
        function = call.get("function") or {}
        if isinstance(function.get("arguments"), str):
            found.append((("tool", call.get("index", 0)), function, "arguments"))
    return found


def _append(delta: dict[str, Any], key: Hashable, text: str) -> None:
    """Add released text to a delta, where `key` says it belongs."""
    if key == "content":
        delta["content"] = (delta.get("content") or "") + text
    else:
        assert isinstance(key, tuple)
        delta.setdefault("tool_calls", []).append({"index": key[1], "function": {"arguments": text}})
