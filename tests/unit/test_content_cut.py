"""The request log's content policy on answers far larger than what it keeps: redaction looks
at what is kept plus a margin, never at the whole answer (a 16 MB answer scanned whole in the
writer thread held the GIL for seconds and stalled every call in flight)."""

from __future__ import annotations

import re
from typing import Any

from keel.config import StoreConfig
from keel.observability.writer import REDACT_MARGIN, REDACTED, ContentPolicy

SECRET = "sk-" + "A1b2C3d4" * 4


class Seen:
    """A pattern that records how much text it was asked to scan."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.lengths: list[int] = []

    def sub(self, replacement: str, text: str) -> str:
        self.lengths.append(len(text))
        return self.pattern.sub(replacement, text)


def policy(max_chars: int) -> tuple[ContentPolicy, Seen]:
    content = ContentPolicy(StoreConfig(max_content_chars=max_chars, redact=[], redact_defaults=False))
    seen = Seen(re.compile(r"sk-[A-Za-z0-9]{20,}"))
    content.patterns = [seen]  # type: ignore[list-item]
    return content, seen


def test_a_huge_answer_is_scanned_only_up_to_the_cut_and_a_margin() -> None:
    content, seen = policy(1000)
    huge = "x" * (16 * 1024 * 1024)
    kept: Any = content.apply({"role": "assistant", "content": huge})  # "assistant" takes 9 of the 1000
    assert seen.lengths and max(seen.lengths) <= 1000 + REDACT_MARGIN
    assert kept["content"] == "x" * 991 + f"…[cut {len(huge) - 991} chars]"


def test_a_secret_across_the_cut_is_still_redacted() -> None:
    content, _ = policy(1000)
    text = "y" * 990 + SECRET + "z" * 5_000_000
    kept = content.apply(text)
    assert SECRET[:10] not in kept and kept.startswith("y" * 990 + REDACTED[:10])
    assert kept.endswith(f"…[cut {len(text) - 1000} chars]")


def test_short_content_is_redacted_whole_and_kept_whole() -> None:
    content, _ = policy(1000)
    assert content.apply(f"key {SECRET} end") == f"key {REDACTED} end"
