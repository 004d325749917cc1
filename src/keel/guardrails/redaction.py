"""Reversible redaction within one call: values go upstream as placeholders (`<EMAIL_ADDRESS_1>`) and
come back for the caller.

A `Redactor` lives for one call and keeps its values in memory only (its repr shows none). The same
value gets the same placeholder every time within the call, whatever type it was found as, so the
model can tell two mentions of one address from two addresses. A placeholder is never one already in
the text being redacted (a user who writes `<EMAIL_ADDRESS_1>` keeps it), and `restore` replaces only
the placeholders this Redactor issued.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from keel.guardrails.pii import Entity

PLACEHOLDER: Final = "PLACEHOLDER"  # the type of the entities `find_placeholders` returns
_PLACEHOLDER: Final = re.compile(r"<[A-Z][A-Z0-9_]*_\d+>")


class Redactor:
    """One per call: reversible placeholders. The same value gets the same placeholder within the call."""

    __slots__ = ("_longest", "_numbers", "_placeholders", "_values")

    def __init__(self) -> None:
        self._placeholders: dict[str, str] = {}  # value -> placeholder
        self._values: dict[str, str] = {}  # placeholder -> value
        self._numbers: dict[str, int] = {}  # type -> last number issued
        self._longest = 0

    def __repr__(self) -> str:
        return f"<Redactor: {len(self._values)} placeholders>"

    @property
    def count(self) -> int:
        """How many distinct values have a placeholder."""
        return len(self._values)

    def placeholder(self, type_: str, value: str, text: str = "") -> str:
        """The placeholder for `value`, issued now if it has none (never one that occurs in `text`)."""
        known = self._placeholders.get(value)
        if known is not None:
            return known
        number = self._numbers.get(type_, 0)
        while True:
            number += 1
            candidate = f"<{type_}_{number}>"
            if candidate not in self._values and candidate not in text:
                break
        self._numbers[type_] = number
        self._placeholders[value] = candidate
        self._values[candidate] = value
        self._longest = max(self._longest, len(candidate))
        return candidate

    def redact(self, text: str, entities: Sequence[Entity]) -> str:
        """`text` with each entity's span replaced by its placeholder (an entity overlapping an earlier
        one is skipped: the scanner's entities never overlap)."""
        if not entities:
            return text
        out: list[str] = []
        position = 0
        for entity in sorted(entities, key=lambda e: e.start):
            if entity.start < position or entity.end <= entity.start:
                continue
            out += [text[position:entity.start], self.placeholder(entity.type, text[entity.start:entity.end], text)]
            position = entity.end
        out.append(text[position:])
        return "".join(out)

    def restore(self, text: str) -> str:
        """`text` with this Redactor's placeholders replaced by their values; anything else unchanged."""
        if not self._values or "<" not in text:
            return text
        return _PLACEHOLDER.sub(lambda m: self._values.get(m.group(), m.group()), text)

    def find_placeholders(self, text: str) -> list[Entity]:
        """This Redactor's placeholders in `text`, as entities of type PLACEHOLDER; and, at the very end of
        the text, the start of one (`<EMAIL_ADDR`), so that a stream's hold-back window keeps it until
        it is whole."""
        if not self._values or "<" not in text:
            return []
        found = [Entity(PLACEHOLDER, m.start(), m.end(), 1.0)
                 for m in _PLACEHOLDER.finditer(text) if m.group() in self._values]
        tail = text.rfind("<", max(0, len(text) - self._longest + 1))
        if tail != -1 and (not found or found[-1].end <= tail):
            partial = text[tail:]
            if any(p.startswith(partial) for p in self._values):
                found.append(Entity(PLACEHOLDER, tail, len(text), 1.0))
        return found
