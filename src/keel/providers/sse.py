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


class SSEParser:
    """Incremental: `feed` any bytes of the body as they arrive (split anywhere), get the events
    they complete; `close` at the end gives the last one if it had no blank line. Lines end with
    \n (a \r before it is dropped), as LLM APIs send them.

    Works on bytes: the common line, `data: {...}`, costs one prefix test and one slice; a
    network read's worth of events is parsed in one call, with no generator per line."""

    __slots__ = ("_data", "_event", "_partial")

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[bytes] = []
        self._event: str | None = None

    def feed(self, part: bytes) -> list[SSEvent]:
        lines = (self._partial + part if self._partial else part).split(b"\n")
        self._partial = lines.pop()
        events: list[SSEvent] = []
        for raw in lines:
            self._line(raw[:-1] if raw.endswith(b"\r") else raw, events)
        return events

    def close(self) -> list[SSEvent]:
        events: list[SSEvent] = []
        if self._partial:
            self._line(self._partial.rstrip(b"\r"), events)
            self._partial = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SSEvent]) -> None:
        if not line:
            if self._data:
                data = self._data
                events.append(SSEvent(data[0] if len(data) == 1 else b"\n".join(data), self._event))
            self._data, self._event = [], None
        elif line.startswith(b"data:"):
            self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        elif not line.startswith(b":"):
            name, _, value = line.partition(b":")
            if name == b"event":
                self._event = value.removeprefix(b" ").decode("utf-8", "replace")


async def read_events(parts: AsyncIterable[bytes]) -> AsyncIterator[SSEvent]:
    """Events from the body's bytes as they arrive: lines, or network reads split anywhere."""
    parser = SSEParser()
    async for part in parts:
        for event in parser.feed(part):
            yield event
    for event in parser.close():
        yield event


DONE = b"data: [DONE]\n\n"


def encode_chunk(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def encode_error(body: dict[str, Any]) -> bytes:
    """An error inside a stream, the way OpenAI sends one: a data event with an `error` object."""
    return b"data: " + orjson.dumps(body) + b"\n\n"
