"""The stores of a cache stage's models: each once (models sharing a `cache` section share one), and
invalidation across them. Shared by the exact and semantic stages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar


class Clearable(Protocol):
    async def clear(
        self, model: str | None = None, tenant: str | None = None, older_than_s: float | None = None,
        key_prefix: str | None = None,
    ) -> int: ...


S = TypeVar("S", bound=Clearable, covariant=True)


class Setting(Protocol[S]):
    @property
    def store(self) -> S: ...


def stores_of(settings: Mapping[str, Setting[S]], model: str | None = None) -> list[S]:
    """Each store once, or `model`'s only (none when that model has no cache of this kind)."""
    if model is not None:
        setting = settings.get(model)
        return [setting.store] if setting is not None else []
    return list({id(s.store): s.store for s in settings.values()}.values())


async def clear_stores(
    settings: Mapping[str, Setting[S]], model: str | None, tenant: str | None, older_than_s: float | None,
    key_prefix: str | None,
) -> int:
    """Remove the entries that match every filter given (none: all) from each store they may be in; how
    many were removed."""
    removed = 0
    for store in stores_of(settings, model):
        removed += await store.clear(model, tenant, older_than_s, key_prefix)
    return removed
