"""Deadlines, retries with backoff, circuit breakers and fallback between deployments."""

from keel.reliability.breaker import BreakerState, CircuitBreaker
from keel.reliability.stage import Reliability

__all__ = ["BreakerState", "CircuitBreaker", "Reliability"]
