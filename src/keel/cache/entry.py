"""What the exact cache stores for a key: the answer as a chat.completion object, what it cost, and
when it was stored (wall-clock seconds: what invalidation by age reads in a shared store)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from keel.cost.money import Nanos


class CorruptEntry(ValueError):
    """A stored entry that no longer parses (another version wrote it, or it was damaged)."""


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    completion: dict[str, Any]  # a chat.completion object, as the call's client got it
    cost_nanos: Nanos  # what it cost when it was stored: what each hit saves
    stored_at: float | None = None  # time.time() when stored; None: not known

    def dumps(self) -> bytes:
        entry: dict[str, Any] = {"completion": self.completion, "cost_nanos": self.cost_nanos}
        if self.stored_at is not None:
            entry["stored_at"] = self.stored_at
        return orjson.dumps(entry)

    @classmethod
    def loads(cls, data: bytes) -> CachedAnswer:
        try:
            raw = orjson.loads(data)
            completion, cost = raw["completion"], raw["cost_nanos"]
            message = completion["choices"][0]["message"]
            stored_at = raw.get("stored_at")
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise CorruptEntry(f"a cache entry does not parse: {exc!r}") from None
        if not isinstance(cost, int) or not isinstance(message, dict) or not isinstance(completion.get("id"), str):
            raise CorruptEntry("a cache entry has the wrong shape")
        if stored_at is not None and (isinstance(stored_at, bool) or not isinstance(stored_at, int | float)):
            raise CorruptEntry("a cache entry's stored_at is not a number")
        return cls(completion, cost, None if stored_at is None else float(stored_at))


def stored_at_of(value: bytes) -> float:
    """When a stored entry was made (what invalidation by age reads in a shared store); -inf (older than
    any age) when that is unknown or the entry does not parse."""
    try:
        stored_at = CachedAnswer.loads(value).stored_at
    except CorruptEntry:
        return float("-inf")
    return float("-inf") if stored_at is None else stored_at
