"""The SSE reader follows the event-stream rules LLM APIs rely on."""

from __future__ import annotations

from collections.abc import AsyncIterator

from keel.providers.sse import SSEParser, SSEvent, encode_chunk, encode_error, read_events


async def events_of(raw: bytes) -> list[SSEvent]:
    async def lines() -> AsyncIterator[bytes]:
        for line in raw.splitlines(keepends=True):
            yield line

    return [event async for event in read_events(lines())]


async def test_one_data_line_per_event() -> None:
    events = await events_of(b'data: {"a":1}\n\ndata: [DONE]\n\n')
    assert [e.data for e in events] == [b'{"a":1}', b"[DONE]"]


async def test_data_lines_of_one_event_are_joined_with_newlines() -> None:
    events = await events_of(b"data: first\ndata: second\n\n")
    assert [e.data for e in events] == [b"first\nsecond"]


async def test_crlf_comments_and_no_space_after_colon() -> None:
    events = await events_of(b": keep-alive\r\ndata:{\"x\":2}\r\n\r\n")
    assert [e.data for e in events] == [b'{"x":2}']


async def test_event_names_are_kept_and_reset_per_event() -> None:
    events = await events_of(b"event: ping\ndata: {}\n\ndata: {}\n\n")
    assert [(e.event, e.data) for e in events] == [("ping", b"{}"), (None, b"{}")]


async def test_a_final_event_without_its_blank_line_still_counts() -> None:
    events = await events_of(b"data: last")
    assert [e.data for e in events] == [b"last"]


async def test_blank_lines_without_data_yield_nothing() -> None:
    assert await events_of(b"\n\n: comment\n\n") == []


def test_chunks_and_errors_are_framed_as_data_events() -> None:
    assert encode_chunk({"a": 1}) == b'data: {"a":1}\n\n'
    assert encode_error({"error": {"message": "m"}}) == b'data: {"error":{"message":"m"}}\n\n'


STREAM = (b": hello\r\n\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\ndata: one\ndata: two\n\n"
          b"data:{\"b\":2}\n\ndata: [DONE]\n\ndata: tail")


def test_events_do_not_depend_on_where_the_reads_split_the_bytes() -> None:
    whole = SSEParser()
    expected = whole.feed(STREAM) + whole.close()
    assert [e.data for e in expected] == [b'{"a":1}', b"one\ntwo", b'{"b":2}', b"[DONE]", b"tail"]
    assert expected[0].event == "message_start"
    for cut in range(len(STREAM) + 1):
        for second in (cut, min(len(STREAM), cut + 1), min(len(STREAM), cut + 7)):
            parser = SSEParser()
            parts = [STREAM[:cut], STREAM[cut:second], STREAM[second:]]
            got = [event for part in parts for event in parser.feed(part)] + parser.close()
            assert got == expected, (cut, second)


async def test_read_events_takes_reads_as_well_as_lines() -> None:
    async def reads() -> AsyncIterator[bytes]:
        for i in range(0, len(STREAM), 5):
            yield STREAM[i:i + 5]

    assert [e.data for e in [event async for event in read_events(reads())]][-2:] == [b"[DONE]", b"tail"]
