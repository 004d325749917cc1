"""Budgets: spend caps in USD per key, user, feature or in all, with alerts, kept in this process or
shared through Redis. (Rate limits on requests and tokens are another stage, with a folder of their own.)"""

from keel.budgets.alerts import AlertSender
from keel.budgets.backends import MemoryBudgetBackend, RedisBudgetBackend
from keel.budgets.budgets import Alert, Budgets, Reservation, RuleEntry
from keel.budgets.counters import BudgetBackend
from keel.budgets.stage import BudgetStage

__all__ = [
    "Alert", "AlertSender", "BudgetBackend", "BudgetStage", "Budgets", "MemoryBudgetBackend", "RedisBudgetBackend",
    "Reservation", "RuleEntry",
]
