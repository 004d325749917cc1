"""The stream hold-back window: a secret split across chunks, at every split point, is caught whole;
released text never holds part of an entity outside the release that reports it; with nothing found,
everything released, in order, is the input."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.guardrails.holdback import DEFAULT_WINDOW, HoldBack
from keel.guardrails.pii import Entity, resolve_overlaps
from keel.guardrails.redaction import PLACEHOLDER, Redactor
from keel.guardrails.secrets import LONGEST_PREFIX, find_secrets

OPENAI_KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcd"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
PEM = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
    "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n"
    "NMoSfm76oqFvAp8Gy0iz5sxjZmSnXyCdPEovGhLa0VzMaQ8s+CLOyS56YyCFGeJZ\n"
    "-----END PRIVATE KEY-----"
)


def scan_secrets(text: str) -> list[Entity]:
    return resolve_overlaps([Entity(*found) for found in find_secrets(text)])


Release = tuple[str, list[Entity]]


def stream(chunks: Sequence[str], window: int, scan: Callable[[str], Sequence[Entity]]) -> list[Release]:
    hold = HoldBack(window, scan)
    releases = [hold.feed(chunk) for chunk in chunks]
    releases.append(hold.finish())
    return releases


def caught(releases: list[Release]) -> list[tuple[str, int, int]]:
    """Every reported entity as (type, start, end) in the whole stream's text."""
    out, offset = [], 0
    for text, entities in releases:
        assert all(0 <= e.start < e.end <= len(text) for e in entities)
        out += [(e.type, offset + e.start, offset + e.end) for e in entities]
        offset += len(text)
    return out


def boundaries(releases: list[Release]) -> list[int]:
    cuts, offset = [], 0
    for text, _ in releases:
        offset += len(text)
        cuts.append(offset)
    return cuts


@pytest.mark.parametrize(("secret", "type_"), [(OPENAI_KEY, "API_KEY"), (AWS_KEY, "API_KEY"), (PEM, "PRIVATE_KEY")])
@pytest.mark.parametrize("window", [LONGEST_PREFIX, DEFAULT_WINDOW])
def test_a_secret_split_at_every_point_is_caught_whole(secret: str, type_: str, window: int) -> None:
    before, after = "Sure! Here is the credential you asked for: ", "\nKeep it safe, and rotate it soon.\n"
    text = before + secret + after
    where = (type_, len(before), len(before) + len(secret))
    for split in range(1, len(text)):
        releases = stream([text[:split], text[split:]], window, scan_secrets)
        assert "".join(r[0] for r in releases) == text
        assert caught(releases) == [where], split
        # No release boundary falls inside the secret: none of it goes out unreported.
        assert not any(where[1] < cut < where[2] for cut in boundaries(releases)), split


@pytest.mark.parametrize(("secret", "type_"), [(OPENAI_KEY, "API_KEY"), (AWS_KEY, "API_KEY"), (PEM, "PRIVATE_KEY")])
def test_a_secret_streamed_one_character_at_a_time_is_caught(secret: str, type_: str) -> None:
    text = "the key: " + secret + " done"
    releases = stream(list(text), LONGEST_PREFIX, scan_secrets)
    assert "".join(r[0] for r in releases) == text
    assert caught(releases) == [(type_, 9, 9 + len(secret))]


def test_a_private_key_longer_than_the_window_is_held_until_its_end_line() -> None:
    hold = HoldBack(LONGEST_PREFIX, scan_secrets)
    released = hold.feed("ok: ")[0]
    for line in PEM.splitlines(keepends=True)[:-1]:
        text, entities = hold.feed(line)
        released += text
        assert entities == []
    assert released == "ok: " and hold.held == len(PEM) - len("-----END PRIVATE KEY-----")
    end = "-----END PRIVATE KEY-----"
    text, entities = hold.feed(end + " and the rest of the answer, long enough to pass the window")
    assert text.startswith(PEM) and entities == [Entity("PRIVATE_KEY", 0, len(PEM), 1.0)]


def test_a_name_released_earlier_still_gives_its_value_context() -> None:
    chunks = ["Set password", " = ", "Tr0ub4dor&3xyz", " in the config, then restart the service please."]
    releases = stream(chunks, 16, scan_secrets)
    text = "".join(chunks)
    start = text.index("Tr0ub")
    assert caught(releases) == [("PASSWORD", start, start + len("Tr0ub4dor&3xyz"))]


def test_placeholders_are_restored_across_chunks() -> None:
    redactor = Redactor()
    prompt = "mail jane@example.com"
    redactor.redact(prompt, [Entity("EMAIL_ADDRESS", 5, 21, 1.0)])
    answer = "I will write to <EMAIL_ADDRESS_1> today, and cc <EMAIL_ADDRESS_1> tomorrow."
    out = ""
    for i in range(0, len(answer), 3):
        chunks = [answer[:i], answer[i:]]
        out = ""
        for text, entities in stream(chunks, 24, redactor.find_placeholders):
            position = 0
            for e in entities:
                assert e.type == PLACEHOLDER
                out += text[position:e.start] + redactor.restore(text[e.start:e.end])
                position = e.end
            out += text[position:]
        assert out == redactor.restore(answer), i


def test_overlapping_entities_from_combined_scanners_are_held_together() -> None:
    deny = re.compile(r"internal project \S+")

    def scan(text: str) -> list[Entity]:
        return [Entity("DENY", m.start(), m.end(), 1.0) for m in deny.finditer(text)] + scan_secrets(text)

    text = "see internal project sk-AbCdEfGhIjKlMnOpQrStUvWx and more text after that to flush it out"
    for split in range(1, len(text)):
        releases = stream([text[:split], text[split:]], LONGEST_PREFIX, scan)
        assert "".join(r[0] for r in releases) == text
        assert sorted(caught(releases)) == [("API_KEY", 21, 48), ("DENY", 4, 48)], split


def test_the_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HoldBack(0, scan_secrets)


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.lists(st.integers(0, 300), max_size=20), st.integers(1, 80))
def test_with_nothing_found_the_releases_are_the_input(text: str, cuts: list[int], window: int) -> None:
    releases = stream(chunked(text, cuts), window, lambda _: [])
    assert "".join(r[0] for r in releases) == text
    assert all(not r[1] for r in releases)
    # Nothing is held beyond the window: each release before the end leaves exactly `window` held.
    fed = 0
    hold = HoldBack(window, lambda _: [])
    released = 0
    for chunk in chunked(text, cuts):
        fed += len(chunk)
        released += len(hold.feed(chunk)[0])
        assert fed - released == min(fed, window)


SECRETS = st.sampled_from([OPENAI_KEY, AWS_KEY, PEM, "ghp_" + "a1B2c3D4e5" * 4, "xoxb-123456789012-abcdefABCDEF"])
FILLER = st.text(alphabet="abcdefgh ,.\n", max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(FILLER, SECRETS), max_size=4), FILLER,
       st.lists(st.integers(0, 1000), max_size=30), st.integers(LONGEST_PREFIX, 120))
def test_every_secret_is_reported_whole_in_one_release(
    parts: list[tuple[str, str]], tail: str, cuts: list[int], window: int,
) -> None:
    text, planted = "", []
    for filler, secret in parts:
        text += filler + " "
        planted.append((len(text), len(text) + len(secret)))
        text += secret + " "
    text += tail
    releases = stream(chunked(text, cuts), window, scan_secrets)
    assert "".join(r[0] for r in releases) == text
    reported = caught(releases)
    cuts_out = boundaries(releases)
    for start, end in planted:
        assert any(s <= start and end <= e for _, s, e in reported), (start, end, reported)
        assert not any(start < cut < end for cut in cuts_out)
