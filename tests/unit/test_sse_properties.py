"""Properties of the SSE reader (keel.providers.sse): any split of a valid stream into byte
pieces parses to the same events, and no bytes at all make it raise."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from keel.providers.sse import SSEParser, SSEvent

# A data line's payload: any text without a line break (JSON chunks, [DONE], multi-byte UTF-8).
PAYLOAD = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30)
NAME = st.none() | st.sampled_from(["message_start", "content_block_delta", "response.output_text.delta", "error"])
EVENT = st.tuples(NAME, st.lists(PAYLOAD, min_size=1, max_size=3), st.booleans(), st.booleans())
EVENTS = st.lists(EVENT, max_size=8)


def encode(events: list[tuple[str | None, list[str], bool, bool]]) -> tuple[bytes, list[SSEvent]]:
    """The wire form of `events` (each: name, data lines, with a comment line, CRLF endings) and what
    a reader must get back."""
    wire = b""
    expected: list[SSEvent] = []
    for name, lines, comment, crlf in events:
        end = b"\r\n" if crlf else b"\n"
        if comment:
            wire += b": keep-alive" + end
        if name is not None:
            wire += b"event: " + name.encode() + end
        for line in lines:
            wire += b"data: " + line.encode() + end
        wire += end
        expected.append(SSEvent(b"\n".join(line.encode() for line in lines), name))
    return wire, expected


def parse(pieces: list[bytes]) -> list[SSEvent]:
    parser = SSEParser()
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events + parser.close()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=120, derandomize=True, deadline=None)
@given(EVENTS, st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_any_split_of_a_stream_parses_to_its_events(events: list[tuple[str | None, list[str], bool, bool]],
                                                    cuts: list[int]) -> None:
    wire, expected = encode(events)
    assert parse([wire]) == expected
    assert parse(split(wire, cuts)) == expected
    assert parse([wire[i:i + 1] for i in range(len(wire))]) == expected  # a byte at a time


@settings(max_examples=50, derandomize=True, deadline=None)
@given(EVENTS)
def test_a_last_event_without_its_blank_line_still_counts(events: list[tuple[str | None, list[str], bool, bool]]
                                                         ) -> None:
    wire, expected = encode(events)
    if wire:
        assert parse([wire.removesuffix(b"\r\n").removesuffix(b"\n")]) == expected


@settings(max_examples=120, derandomize=True, deadline=None)
@given(st.lists(st.binary(max_size=40) | st.sampled_from([b"data:", b"event:", b"\r", b"\n", b":", b"\xff"]),
                max_size=20))
def test_garbage_never_raises(pieces: list[bytes]) -> None:
    """The parser has no error of its own: any bytes give events (bytes data, str names), never an exception;
    a bad payload is the caller's JSON parser's to refuse."""
    for event in parse(pieces):
        assert isinstance(event.data, bytes)
        assert event.event is None or isinstance(event.event, str)
