"""A stream's hold-back window: the last `window` characters are kept back until more text comes, so
that a match spanning chunks is seen whole before any of it is released.

Each `feed` scans the unreleased text plus up to `window` characters already released before it (left
context, for patterns such as `password = ...` whose name came earlier), and releases everything but
the last `window` characters, and never the start of an entity that reaches into the held part: that
entity, and all after its start, stays held until it ends inside the window or the stream finishes.
So an entity is caught whole if the scanner recognises it once at most `window` characters of it have
arrived, and keeps recognising it from the same start as it grows: true of every pattern in
`keel.guardrails.pii` and `keel.guardrails.secrets` (a PEM key matches from its BEGIN line on, to the
end of the text until its END line comes) and of `Redactor.find_placeholders` (a placeholder's start
at the end of the text is one). `keel.guardrails.secrets.LONGEST_PREFIX` is the least window for the
secret patterns; `DEFAULT_WINDOW` leaves room for cards, IBANs, phone numbers and most emails.

Cost: a feed with nothing to release (the pending text shorter than the window) scans nothing; after
that, each feed scans about two windows plus the new text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from keel.guardrails.pii import Entity

DEFAULT_WINDOW: Final = 128


class HoldBack:
    """Text of a stream held back `window` characters so a match that spans chunks is seen whole."""

    __slots__ = ("_context", "_pending", "_scan", "window")

    def __init__(self, window: int, scan: Callable[[str], Sequence[Entity]]) -> None:
        if window < 1:
            raise ValueError(f"the hold-back window must be at least 1 character, not {window}")
        self.window = window
        self._scan = scan
        self._pending = ""  # not released yet
        self._context = ""  # the last `window` characters released, scanned again for left context

    @property
    def held(self) -> int:
        """How many characters are held back now."""
        return len(self._pending)

    def feed(self, delta: str) -> tuple[str, list[Entity]]:
        """Text safe to release now, and the entities inside it (offsets relative to that text)."""
        self._pending += delta
        if len(self._pending) <= self.window:
            return "", []
        return self._release(len(self._pending) - self.window)

    def finish(self) -> tuple[str, list[Entity]]:
        """The rest, at the end of the stream."""
        if not self._pending:
            return "", []
        return self._release(len(self._pending))

    def _release(self, cut: int) -> tuple[str, list[Entity]]:
        offset = len(self._context)
        found = [
            Entity(e.type, max(e.start - offset, 0), e.end - offset, e.score)
            for e in self._scan(self._context + self._pending)
            if e.end > offset and e.end > e.start  # wholly in text released before: judged then
        ]
        # Hold from the start of anything reaching past the cut, and of anything reaching past that start
        # (the scan callable may combine scanners whose entities overlap), until nothing does.
        held_from = cut
        moved = True
        while moved:
            moved = False
            for entity in found:
                if entity.start < held_from < entity.end:
                    held_from = entity.start
                    moved = True
        released = self._pending[:held_from]
        self._pending = self._pending[held_from:]
        self._context = (self._context + released)[-self.window:]
        return released, sorted((e for e in found if e.end <= held_from), key=lambda e: (e.start, e.end))
