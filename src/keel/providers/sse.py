"""Server-sent events: reading an upstream's stream and writing the client's.

The reader follows the WHATWG event-stream rules that matter for LLM APIs: `data:` lines
of one event are joined with newlines, a blank line ends the event, `:` lines are comments,
`event:` names the event, and a final event without its blank line still counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class SSEvent:
    data: bytes  # UTF-8; orjson parses bytes directly, so it is not decoded here
    event: str | None = None


async def read_events(lines: AsyncIterable[bytes]) -> AsyncIterator[SSEvent]:
    """Events from an iterable of raw lines (each may end with \\n or \\r\\n).

    Works on bytes: the common line, `data: {...}`, costs one prefix test and one slice."""
    data: list[bytes] = []
    event: str | None = None
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield SSEvent(data[0] if len(data) == 1 else b"\n".join(data), event)
            data, event = [], None
        elif line.startswith(b"data:"):
            data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        elif line.startswith(b":"):
            continue
        else:
            name, _, value = line.partition(b":")
            if name == b"event":
                event = value.removeprefix(b" ").decode("utf-8", "replace")
    if data:
        yield SSEvent(data[0] if len(data) == 1 else b"\n".join(data), event)


DONE = b"data: [DONE]\n\n"


def encode_chunk(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def encode_error(body: dict[str, Any]) -> bytes:
    """An error inside a stream, the way OpenAI sends one: a data event with an `error` object."""
    return b"data: " + orjson.dumps(body) + b"\n\n"
