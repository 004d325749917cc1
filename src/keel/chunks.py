"""A chat.completion as the chunks a live stream would have sent, and back.

`replay` gives a role chunk, the content (or tool calls), the finish, then the usage chunk (a stream
hides it from clients that did not ask for it, as for a live stream); `folded` adds chunks up to the
chat.completion a non-streamed call would have returned. Used by the caches (hits replayed to streamed
calls) and the validation stage (a buffered stream checked whole, then sent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from keel.pipeline import ChunkStream


def replay(completion: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    return _iterate(replay_chunks(completion))


async def folded(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat.completion that `chunks` add up to (the opposite of `replay_chunks`)."""
    stream = ChunkStream(_iterate(chunks))
    async for _ in stream:
        pass
    return stream.completion()


async def _iterate(chunks: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for chunk in chunks:
        yield chunk


def replay_chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    choice = completion["choices"][0]
    message = choice["message"]
    head: dict[str, Any] = {"id": completion["id"], "object": "chat.completion.chunk",
                            "created": completion.get("created"), "model": completion.get("model")}
    if completion.get("system_fingerprint") is not None:
        head["system_fingerprint"] = completion["system_fingerprint"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    if message.get("content"):
        chunks.append(chunk({"content": message["content"]}))
    if message.get("refusal"):
        chunks.append(chunk({"refusal": message["refusal"]}))
    for index, call in enumerate(message.get("tool_calls") or ()):
        chunks.append(chunk({"tool_calls": [{"index": index, **call}]}))
    chunks.append(chunk({}, choice.get("finish_reason")))
    if completion.get("usage"):
        chunks.append({**head, "choices": [], "usage": completion["usage"]})
    return chunks
