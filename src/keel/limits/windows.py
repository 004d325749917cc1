"""What a sliding-window counter holds, and what follows from it: how much is left, when it is all
back, and how long a call of a given cost has to wait.

The `limits` library's sliding-window counter keeps two counts per limit: the current window's
and the previous one's. The previous count weighs in proportion to the time its window still
overlaps the last minute (`previous_ttl / expiry`), so the count slides instead of dropping to zero
on the minute. A window "shifts" (current becomes previous, a new current starts at 0) one expiry
after it began; the library's memory storage starts windows on the clock's minutes, its Redis
storage at the first hit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Window:
    """One limit's counts as read at `read_at` (Unix time), in the library's terms."""

    previous_count: int
    previous_ttl: float  # seconds the previous window still weighs in
    current_count: int
    current_ttl: float  # seconds until the current window's count is gone: its shift + one expiry
    expiry: float  # the window's length: 60 s for per-minute limits
    read_at: float

    @property
    def used(self) -> int:
        """The count the library compares with the limit (its own rounding: the weighted part floored)."""
        return math.floor(self.previous_count * self.previous_ttl / self.expiry) + self.current_count

    @property
    def shift_at(self) -> float:
        """When the current window becomes the previous one (Unix time)."""
        return self.read_at + self.current_ttl - self.expiry

    def remaining(self, limit: int) -> int:
        return max(0, limit - self.used)

    def reset_in(self) -> float:
        """Seconds until nothing counted now weighs in any more (OpenAI's x-ratelimit-reset-*)."""
        if self.current_count:
            return max(0.0, self.current_ttl)
        if self.previous_count:
            return max(0.0, self.previous_ttl)
        return 0.0

    def wait_for(self, cost: int, limit: int) -> float:
        """Seconds until a hit of `cost` fits under `limit`, if nothing else is counted meanwhile
        (the Retry-After of a refusal). `cost` must not exceed `limit`."""
        room = limit - cost
        if self.used <= room:
            return 0.0
        previous, current = self.previous_count, self.current_count
        shift_in = max(0.0, self.current_ttl - self.expiry) if current else 0.0
        if current <= room:
            # The previous count fades until the shift; after it, only the current count is left
            # (as the previous one), and it fits.
            wait = self.previous_ttl - (room - current) * self.expiry / previous
            return max(0.0, wait) if not current or wait <= shift_in else shift_in
        # The current count itself is too much: it fades over the expiry after the shift.
        return shift_in + self.expiry * (1 - room / current)
