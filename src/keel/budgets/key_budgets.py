"""A virtual key's own budgets (`keel keys create --budget-usd`), as budget rules of scope `key`.

Each is a rule `{scope: key, match: <key id>, window, limit_usd}` with the default alert shares,
added to a call's rules when the call comes with that key: it counts on the same counter as a
keel.yaml or admin rule for that key and window, so both count and the lower limit binds. The
rules are built once per key budget and reused (a call's hot path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from pydantic import ValidationError

from keel.config import BudgetConfig
from keel.errors import KeelError

if TYPE_CHECKING:
    from keel.auth.keys import KeyBudget, VirtualKey

MAX_REMEMBERED = 10_000


class InvalidKeyBudget(KeelError):
    """A key's stored budget is not a valid budget: its calls are refused rather than run unmetered."""

    status = 500
    type = "api_error"
    code = "invalid_key_budget"


class KeySource(Protocol):
    """Where the budgets view finds the keys whose own budgets it shows (`keel.auth.store.KeyStore`)."""

    def list(self, tenant: str | None = None) -> Sequence[VirtualKey]: ...


class KeyBudgetRules:
    """The rules of keys' own budgets, each built once."""

    def __init__(self) -> None:
        self._built: dict[tuple[str, KeyBudget], BudgetConfig] = {}

    def of(self, key: VirtualKey | None) -> list[BudgetConfig]:
        """The rules of `key`'s own budgets; none without a key (master key, in-process calls)."""
        if key is None or not key.budgets:
            return []
        return [self._rule(key.id, budget) for budget in key.budgets]

    def _rule(self, key_id: str, budget: KeyBudget) -> BudgetConfig:
        known = self._built.get((key_id, budget))
        if known is not None:
            return known
        try:
            rule = BudgetConfig.model_validate(
                {"scope": "key", "match": key_id, "window": budget.window, "limit_usd": budget.limit_usd}
            )
        except ValidationError as exc:
            raise InvalidKeyBudget(
                f"The key {key_id} has an invalid budget stored ({budget.as_dict()}: "
                f"{exc.errors()[0]['msg']}), so its calls are refused. Ask your administrator to revoke it "
                "and create a new key with a valid budget (a limit above 0 USD; window day, month or total)."
            ) from None
        if len(self._built) >= MAX_REMEMBERED:  # revoked and old keys: forget them now and then
            self._built.clear()
        self._built[(key_id, budget)] = rule
        return rule
