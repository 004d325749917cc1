"""Numbers in messages people read: `1 error`, `2 errors`, `1,000 requests`."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """`n` and `noun`, plural unless n is 1; thousands separated."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
