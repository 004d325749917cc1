"""A virtual key: the secret a client sends, and what Keel keeps of it.

The secret is `sk-keel-` and 43 URL-safe characters (256 random bits); Keel keeps only its
SHA-256, which is enough for a key that cannot be guessed (no salt or slow hash needed: those
protect low-entropy passwords). The secret is shown once, when the key is created.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from keel.types import no_control_characters

KEY_PREFIX = "sk-keel-"
_WELL_FORMED = re.compile(r"sk-keel-[A-Za-z0-9_-]{43}")
TIER_CHARS = 64  # a tier is a short label (`free`, `pro`), matched by routing rules' `key_tiers`


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "vk_" + secrets.token_hex(8)


def check_tier(tier: str | None) -> str | None:
    """A key's tier as given, or ValueError saying what is wrong: a plain label of 1 to 64 characters
    (it reaches routing decisions, logs and the admin API)."""
    if tier is None:
        return None
    if not tier.strip() or len(tier) > TIER_CHARS:
        raise ValueError(f"a key's tier is a label of 1 to {TIER_CHARS} characters, such as 'free' or 'pro'")
    try:
        return no_control_characters(tier)
    except ValueError as exc:
        raise ValueError(f"a key's tier: {exc}") from None


def digest(secret: str) -> str:
    """The stored form of a key: hex SHA-256."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Credential:
    """What a caller presented, as its digest: the secret itself never enters the context."""

    digest: str | None  # None: no key was sent
    well_formed: bool  # shaped like a virtual key (the master key may have any shape)

    @classmethod
    def of(cls, authorization: str | None) -> Credential:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return cls(None, False)
        return cls(digest(token), _WELL_FORMED.fullmatch(token) is not None)

    def matches(self, stored_digest: str) -> bool:
        return self.digest is not None and hmac.compare_digest(self.digest, stored_digest)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """The key's own rate limits; None: the configured defaults apply (read by keel.limits)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrency: int | None = None  # calls in flight at once, in each process (keel.limits.concurrency)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in (("requests_per_minute", self.requests_per_minute),
                                  ("tokens_per_minute", self.tokens_per_minute),
                                  ("max_concurrency", self.max_concurrency)) if v is not None}


@dataclass(frozen=True, slots=True)
class KeyBudget:
    """A spend cap of the key's own (stored with it; counted under the budget scope `key`)."""

    limit_usd: float
    window: str = "month"  # day | month | total

    def as_dict(self) -> dict[str, Any]:
        return {"limit_usd": self.limit_usd, "window": self.window}


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """A key as stored: everything but the secret."""

    id: str
    tenant: str
    digest: str
    owner: str | None = None
    label: str | None = None
    models: tuple[str, ...] | None = None  # None: every model
    limits: KeyLimits = field(default_factory=KeyLimits)
    budgets: tuple[KeyBudget, ...] = ()
    admin: bool = False  # may use the admin API for its own tenant
    created_at: float = 0.0  # unix seconds
    expires_at: float | None = None
    revoked_at: float | None = None
    hint: str = ""  # the secret's last four characters, to tell keys apart in a list
    tier: str | None = None  # a label (`free`, `pro`) routing rules can match (`key_tiers`); None: no tier

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict[str, Any]:
        """The key as the admin API and `keel keys list` show it: never the digest."""
        return {
            "id": self.id, "object": "virtual_key", "tenant": self.tenant, "owner": self.owner, "label": self.label,
            "tier": self.tier, "models": list(self.models) if self.models is not None else None,
            "limits": self.limits.as_dict(), "budgets": [b.as_dict() for b in self.budgets],
            "admin": self.admin, "created_at": self.created_at, "expires_at": self.expires_at,
            "revoked_at": self.revoked_at, "hint": f"{KEY_PREFIX}...{self.hint}",
        }
