"""Which rate limits a call is counted against: keel.yaml's `limits:`, a model's own `limits:`, and
the caller's virtual key's own limits, resolved once per model at start-up and per call in a few
dictionary lookups.

Per scope (global, key, user, model) and kind (requests, tokens), at most one limit applies:

- `global` and `per_model` come from the top level; a model's `per_model` replaces the latter's value.
- `per_key` / `per_user`: a model's own entry replaces the top-level one for calls to that model,
  counted per key (user) *and* model; otherwise the top-level one, counted per key (user) over
  every model. A virtual key's own limits replace the top-level `per_key` (a model's own `per_key`
  still applies on top). A call without a key (no master key set, in-process use) or without a
  `user` is not counted for that scope.

Each entry is a field-by-field replacement: a model that sets only `per_key.requests_per_minute`
keeps the top-level `per_key.tokens_per_minute`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from limits import RateLimitItem, RateLimitItemPerMinute

from keel.config import KeelConfig, LimitsConfig, ModelConfig, RateLimitConfig

Kind = Literal["requests", "tokens"]
Scope = Literal["global", "key", "user", "model"]
KINDS: tuple[Kind, ...] = ("requests", "tokens")
MAX_CACHED = 10_000
_FIELDS: Mapping[Kind, str] = {"requests": "requests_per_minute", "tokens": "tokens_per_minute"}


@dataclass(frozen=True, slots=True)
class Limit:
    """One counter a call is charged to: `item` (the `limits` library's, amount per minute) under
    `identifiers`. `who` names the counter in messages ("key 'vk_1'", "all calls"); `key` is the
    counter's key in the backend (the library's own, before the backend's prefix)."""

    scope: Scope
    kind: Kind
    item: RateLimitItem
    identifiers: tuple[str, ...]
    who: str
    key: str = ""
    amount: int = 0
    expiry: int = 60  # seconds: the window's length

    def __post_init__(self) -> None:  # computed once: a call's path only reads them
        object.__setattr__(self, "key", self.item.key_for(*self.identifiers))
        object.__setattr__(self, "amount", self.item.amount)
        object.__setattr__(self, "expiry", self.item.get_expiry())


@dataclass(frozen=True, slots=True)
class _Rule:
    scope: Scope
    kind: Kind
    item: RateLimitItem
    per_model: bool  # a model's own per_key / per_user: counted per caller and model


class RateRules:
    """The limits of each model, resolved from the config once."""

    def __init__(self, limits: LimitsConfig, models: list[ModelConfig]) -> None:
        self._items: dict[tuple[Kind, int], RateLimitItem] = {}
        self._seen: dict[tuple[_Rule, str, str], Limit] = {}  # the per-key and per-user limits of recent callers
        self._rules = {model.name: self._resolve(limits, model) for model in models}
        # The limits that name no caller (global, per model) are the same on every call: built once.
        self._fixed = {name: [self._fixed_limit(rule, name) for rule in rules if rule.scope in ("global", "model")]
                       for name, rules in self._rules.items()}
        self._callers = {name: [rule for rule in rules if rule.scope in ("key", "user")]
                         for name, rules in self._rules.items()}
        self.default_max_tokens = limits.default_max_tokens

    @classmethod
    def from_config(cls, config: KeelConfig) -> RateRules:
        return cls(config.limits, config.models)

    @property
    def any(self) -> bool:
        """Whether some model has a limit of its own or a default one."""
        return any(self._rules.values())

    def for_call(self, model: str, key_id: str | None, user: str | None, key_limits: Any = None) -> list[Limit]:
        """The limits a call to `model` by this key and user is charged to. `key_limits`: the
        virtual key's own (`requests_per_minute`, `tokens_per_minute`; None where unset)."""
        found = list(self._fixed.get(model, ()))
        for rule in self._callers.get(model, ()):
            if rule.scope == "key":
                if key_id is None:
                    continue
                own = getattr(key_limits, _FIELDS[rule.kind], None) if key_limits is not None else None
                if own is not None and not rule.per_model:
                    continue  # the key's own limit replaces the default one (added below)
                found.append(self._per_caller(rule, "key", key_id, f"key '{key_id}'", model))
            elif user is not None:
                found.append(self._per_caller(rule, "user", _user_id(user), "this user", model))
        if key_id is not None and key_limits is not None:
            for kind in KINDS:
                own = getattr(key_limits, _FIELDS[kind], None)
                if own is not None:
                    rule = _Rule("key", kind, self._item(kind, int(own)), per_model=False)
                    found.append(self._per_caller(rule, "key", key_id, f"key '{key_id}'", ""))
        return found

    def completion_allowance(self, deployment_config: Any) -> int:
        """Completion tokens charged up front for a request without max_tokens: its deployment's
        default when it has one (local, anthropic), else `limits.default_max_tokens`."""
        default = getattr(deployment_config, "default_max_tokens", None)
        return int(default) if isinstance(default, int) else self.default_max_tokens

    def _fixed_limit(self, rule: _Rule, model: str) -> Limit:
        if rule.scope == "global":
            return Limit("global", rule.kind, rule.item, ("global",), "all calls")
        return Limit("model", rule.kind, rule.item, ("model", model), f"model '{model}'")

    def _per_caller(self, rule: _Rule, scope: Scope, value: str, who: str, model: str) -> Limit:
        cached = self._seen.get((rule, value, model))
        if cached is not None:
            return cached
        if len(self._seen) >= MAX_CACHED:
            self._seen.clear()  # callers come and go: start over rather than grow
        identifiers = (scope, value, "model", model) if rule.per_model else (scope, value)
        limit = Limit(scope, rule.kind, rule.item, identifiers, f"{who} on model '{model}'" if rule.per_model else who)
        self._seen[(rule, value, model)] = limit
        return limit

    def _resolve(self, limits: LimitsConfig, model: ModelConfig) -> tuple[_Rule, ...]:
        own = model.limits
        entries: list[tuple[Scope, RateLimitConfig | None, RateLimitConfig | None]] = [
            ("global", limits.global_, None),
            ("model", limits.per_model, own.per_model if own else None),
            ("key", limits.per_key, own.per_key if own else None),
            ("user", limits.per_user, own.per_user if own else None),
        ]
        rules: list[_Rule] = []
        for scope, default, override in entries:
            for kind in KINDS:
                mine = getattr(override, _FIELDS[kind]) if override is not None else None
                value = mine if mine is not None else (getattr(default, _FIELDS[kind]) if default else None)
                if value is not None:
                    counted_apart = mine is not None and scope in ("key", "user")
                    rules.append(_Rule(scope, kind, self._item(kind, value), counted_apart))
        return tuple(rules)

    def _item(self, kind: Kind, amount: int) -> RateLimitItem:
        item = self._items.get((kind, amount))
        if item is None:
            item = self._items[(kind, amount)] = RateLimitItemPerMinute(amount, namespace=kind)
        return item


def _user_id(user: str) -> str:
    """A client-given user name as a short, fixed-shape key part (no '/', no Redis hash tag braces)."""
    return hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()
