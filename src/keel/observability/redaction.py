"""What the request log never keeps in plain text: the built-in redactions (API keys, bearer
tokens, AWS keys, card numbers, emails), and the user's own `store.redact` expressions added to them.

Each redaction has `sub(replacement, text)`, like a compiled regular expression, so the writer
applies built-in and user patterns alike. They run in the writer thread, once per logged string:
their cost is the log's throughput, not the call's latency (bench/log_store.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol


class Redaction(Protocol):
    def sub(self, repl: str, string: str) -> str: ...


# Each key pattern starts with a literal, so the regex engine skips to it instead of trying every
# character. Lengths are the vendors' documented minimums, to spare ordinary words such as "sk-learn".
API_KEYS: dict[str, str] = {
    "OpenAI/Anthropic-style secret key (sk-...)": r"sk-[A-Za-z0-9_\-]{20,}",
    "bearer token": r"(?i:bearer)\s+[A-Za-z0-9\-._~+/]{16,}=*",
    "AWS access key id": r"(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret access key (with its name)": r"(?i:aws_secret_access_key)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{40}",
    "GitHub token": r"gh[pousr]_[A-Za-z0-9]{36,}",
    "Google API key": r"AIza[0-9A-Za-z_\-]{35}",
    "Slack token": r"xox[abposr]-[A-Za-z0-9\-]{10,}",
}
EMAIL = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"


class CardNumbers:
    """Payment card numbers: 13 to 19 digits, in groups split by single spaces or dashes, that pass
    the Luhn check (as every issued card number does, and one random digit run in ten). A longer
    run of groups is searched for whole groups that form one ("4111 1111 1111 1111 12 28": a card
    and its expiry); 20 or more digits in one unbroken group are an id, not a card."""

    _RUN = re.compile(r"\d(?:[ \-]?\d){12,}")  # runs shorter than a card are never looked at
    _GROUP = re.compile(r"\d+")

    def sub(self, repl: str, string: str) -> str:
        return self._RUN.sub(lambda match: self._redact_run(match.group(), repl), string)

    def _redact_run(self, run: str, repl: str) -> str:
        groups = [(m.start(), m.end()) for m in self._GROUP.finditer(run)]
        out: list[str] = []
        kept_to = 0  # run[:kept_to] is already in out
        i = 0
        while i < len(groups):
            end = self._card_from(run, groups, i)
            if end is None:
                i += 1
                continue
            out += [run[kept_to:groups[i][0]], repl]
            kept_to = groups[end - 1][1]
            i = end
        return "".join(out) + run[kept_to:] if out else run

    @staticmethod
    def _card_from(run: str, groups: list[tuple[int, int]], first: int) -> int | None:
        """The end (exclusive group index) of the longest card starting at group `first`, if any."""
        found = None
        digits = ""
        for j in range(first, len(groups)):
            digits += run[groups[j][0]:groups[j][1]]
            if len(digits) > 19:
                break
            if len(digits) >= 13 and luhn_valid(digits):
                found = j + 1
        return found


def luhn_valid(candidate: str) -> bool:
    """Whether the digits of `candidate` pass the Luhn (mod 10) check."""
    total = 0
    for i, char in enumerate(reversed([c for c in candidate if c.isdigit()])):
        digit = int(char)
        if i % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


class Emails:
    """Email addresses; the pattern is only run on text that has an '@'."""

    _ADDRESS = re.compile(EMAIL)

    def sub(self, repl: str, string: str) -> str:
        return self._ADDRESS.sub(repl, string) if "@" in string else string


def builtin_redactions() -> list[Redaction]:
    """The redactions applied by default (`store.redact_defaults: true`)."""
    return [*(re.compile(pattern) for pattern in API_KEYS.values()), CardNumbers(), Emails()]


def redaction_patterns(patterns: Sequence[str], defaults: bool = True) -> list[Redaction]:
    """The built-in redactions (unless `defaults` is false), then the `store.redact` expressions,
    compiled; a bad one is named with its index. Applied one after the other: an alternation of
    them all would lose each one's fast prefix scan."""
    compiled: list[Redaction] = builtin_redactions() if defaults else []
    for i, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"store.redact[{i}] is not a valid regular expression ({exc}): {pattern!r}") from None
    return compiled
