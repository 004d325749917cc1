"""Which window a moment falls in: a UTC calendar day, a UTC calendar month, or all time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from keel.config import BudgetWindow


@dataclass(frozen=True, slots=True)
class Period:
    """One occurrence of a window: its label in counter keys, and when the next one starts."""

    window: BudgetWindow
    label: str  # "2026-11-27" (day), "2026-11" (month), "total"
    starts_at: datetime | None  # UTC; None for "total"
    resets_at: datetime | None  # UTC, when the next one starts; None for "total"

    def holds(self, now: float) -> bool:
        """Whether the Unix time `now` falls in this period."""
        if self.starts_at is None or self.resets_at is None:
            return True
        return self.starts_at.timestamp() <= now < self.resets_at.timestamp()


def period_at(window: BudgetWindow, now: float) -> Period:
    """The period of `window` that the Unix time `now` falls in."""
    moment = datetime.fromtimestamp(now, UTC)
    if window == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return Period(window, start.strftime("%Y-%m-%d"), start, start + timedelta(days=1))
    if window == "month":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
            month=start.month + 1
        )
        return Period(window, start.strftime("%Y-%m"), start, following)
    return Period(window, "total", None, None)
