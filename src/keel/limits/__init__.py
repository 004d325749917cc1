"""Limits: spend caps (budgets) with alerts, in this process or shared through Redis."""

from keel.limits.alerts import AlertSender
from keel.limits.backends import MemoryBudgetBackend, RedisBudgetBackend
from keel.limits.budgets import Alert, Budgets, Reservation, RuleEntry
from keel.limits.counters import BudgetBackend
from keel.limits.stage import BudgetStage

__all__ = [
    "Alert", "AlertSender", "BudgetBackend", "BudgetStage", "Budgets", "MemoryBudgetBackend", "RedisBudgetBackend",
    "Reservation", "RuleEntry",
]
