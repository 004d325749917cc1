"""Rate limits: requests and tokens per minute, per key, user, model and in all, kept in this process
or shared through Redis (the `limits` library's sliding-window counters). Spend caps in USD are
budgets, in `keel.budgets`."""

from keel.limits.backends import MemoryRateLimitBackend, RateLimitBackend, RedisRateLimitBackend
from keel.limits.headers import RateLimitState, Reading
from keel.limits.limiter import Charge, RateLimiter
from keel.limits.rules import Limit, RateRules
from keel.limits.stage import RateLimitStage
from keel.limits.windows import Window

__all__ = [
    "Charge", "Limit", "MemoryRateLimitBackend", "RateLimitBackend", "RateLimitStage", "RateLimitState",
    "RateLimiter", "RateRules", "Reading", "RedisRateLimitBackend", "Window",
]
