"""What the exact cache stores for a key: the answer as a chat.completion object and what it cost."""

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

    def dumps(self) -> bytes:
        return orjson.dumps({"completion": self.completion, "cost_nanos": self.cost_nanos})

    @classmethod
    def loads(cls, data: bytes) -> CachedAnswer:
        try:
            raw = orjson.loads(data)
            completion, cost = raw["completion"], raw["cost_nanos"]
            message = completion["choices"][0]["message"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise CorruptEntry(f"a cache entry does not parse: {exc!r}") from None
        if not isinstance(cost, int) or not isinstance(message, dict) or not isinstance(completion.get("id"), str):
            raise CorruptEntry("a cache entry has the wrong shape")
        return cls(completion, cost)
