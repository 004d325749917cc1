"""`keel keys create | list | update | revoke`: virtual keys in the request-log database (store.url), the
same the gateways read. The secret of a new key goes to stdout, alone, once; the rest to stderr,
so `KEY=$(keel keys create --tenant team-a)` keeps it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from keel.auth.store import KeyStore

keys_app = typer.Typer(help="Virtual API keys: create, list, update, revoke.", no_args_is_help=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="keel.yaml: its store.url holds the keys")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
# The fields `create` sets and `update` changes (keel.auth.admin.KeyFields), declared once for both.
OwnerOption = Annotated[str | None, typer.Option(help="the user or service holding it")]
LabelOption = Annotated[str | None, typer.Option(help="a note to tell keys apart")]
TierOption = Annotated[str | None, typer.Option(help="a label routing rules match (key_tiers): free, pro, ...")]
ModelsOption = Annotated[list[str] | None, typer.Option(
    "--model", "-m", help="a model it may use (repeat): the whole list; a key without one may use every model")]
RpmOption = Annotated[int | None, typer.Option(help="its own requests per minute")]
TpmOption = Annotated[int | None, typer.Option(help="its own tokens per minute")]
ConcurrencyOption = Annotated[int | None, typer.Option(help="its own calls in flight at once (per process)")]
BudgetOption = Annotated[float | None, typer.Option(help="its own spend cap, USD")]
WindowOption = Annotated[str, typer.Option(help="the cap's window: day, month or total")]
ExpiresOption = Annotated[str | None, typer.Option(help="lifetime from now: 30m, 24h, 90d")]


@contextmanager
def _keys(config: Path | None) -> Iterator[KeyStore]:
    """The key store of the config's request log, its schema created or upgraded first."""
    from keel.cli import _fail, _load
    from keel.observability.store import RecordStore, StoreError

    _, cfg = _load(config, calls_upstreams=False)
    try:
        store = RecordStore(cfg.store.url)
        try:
            store.migrate()
            yield KeyStore(store)
        finally:
            store.close()
    except StoreError as exc:
        raise _fail(str(exc), 1) from None


@keys_app.command()
def create(
    tenant: Annotated[str, typer.Option(help="the team or customer the key belongs to")],
    config: ConfigOption = None,
    owner: OwnerOption = None,
    label: LabelOption = None,
    tier: TierOption = None,
    model: ModelsOption = None,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    max_concurrency: ConcurrencyOption = None,
    budget_usd: BudgetOption = None,
    budget_window: WindowOption = "month",
    admin: Annotated[bool, typer.Option("--admin", help="may use the admin API, for its tenant only")] = False,
    expires_in: ExpiresOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a key. Its secret is printed once, now: Keel keeps only its hash."""
    from keel.auth.admin import KeyBudgetSpec, NewKey
    from keel.auth.admin import create as create_key
    from keel.cli import _fail
    from keel.observability.report import parse_window
    from keel.validation_errors import describe

    try:
        spec = NewKey(
            tenant=tenant, owner=owner, label=label, tier=tier, models=model or None, requests_per_minute=rpm,
            tokens_per_minute=tpm, max_concurrency=max_concurrency, admin=admin,
            budgets=[KeyBudgetSpec.model_validate({"limit_usd": budget_usd, "window": budget_window})]
            if budget_usd is not None else [],
            expires_in_s=parse_window(expires_in) if expires_in else None,
        )
    except ValidationError as exc:
        raise _fail(f"the key is invalid: {describe(exc, NewKey)}", 2) from None
    except ValueError as exc:
        raise _fail(str(exc).replace("--since", "--expires-in"), 2) from None
    with _keys(config) as keys:
        key, secret = create_key(keys, spec, tenant)
    if as_json:
        sys.stdout.write(orjson.dumps({**key.public(), "key": secret}).decode() + "\n")
        return
    Console(stderr=True).print(
        f"Created key {key.id} of tenant '{key.tenant}'. Its secret, shown this once (store it now):", highlight=False
    )
    sys.stdout.write(secret + "\n")


@keys_app.command("list")
def list_keys(
    config: ConfigOption = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
    as_json: JsonOption = False,
) -> None:
    """The keys (never their secrets): id, tenant, owner, tier, models, expiry, revocation."""
    import time

    with _keys(config) as keys:
        found = keys.list(tenant)
    if as_json:
        sys.stdout.write(orjson.dumps([key.public() for key in found]).decode() + "\n")
        return
    table = Table(title=f"{len(found)} key(s)", title_justify="left")
    for header in ("id", "tenant", "owner", "label", "tier", "models", "admin", "state", "hint"):
        table.add_column(header, overflow="fold")
    now = time.time()
    for key in found:
        state = "revoked" if key.revoked_at else "expired" if not key.usable(now) else "active"
        table.add_row(key.id, key.tenant, key.owner or "", key.label or "", key.tier or "",
                      ", ".join(key.models or ("all",)),
                      "yes" if key.admin else "", state, key.public()["hint"])
    Console(soft_wrap=False).print(table)


# `keel keys update --clear NAME`: the option's name -> KeyChange's field
CLEARABLE = {"owner": "owner", "label": "label", "tier": "tier", "models": "models", "rpm": "requests_per_minute",
             "tpm": "tokens_per_minute", "max-concurrency": "max_concurrency", "budgets": "budgets",
             "expiry": "expires_in_s"}


@keys_app.command()
def update(
    key_id: Annotated[str, typer.Argument(help="the key's id (vk_...), from `keel keys list`")],
    config: ConfigOption = None,
    owner: OwnerOption = None,
    label: LabelOption = None,
    tier: TierOption = None,
    model: ModelsOption = None,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    max_concurrency: ConcurrencyOption = None,
    budget_usd: BudgetOption = None,  # replaces its caps
    budget_window: WindowOption = "month",
    expires_in: ExpiresOption = None,
    clear: Annotated[list[str] | None, typer.Option(
        help=f"unset a field (repeat): {', '.join(CLEARABLE)}")] = None,
    as_json: JsonOption = False,
) -> None:
    """Change a key in place (its tier, models, limits, caps, expiry, owner, label): every gateway
    uses the change within a second. The secret, tenant and admin right stay."""
    import time

    from keel.auth.admin import KeyChange
    from keel.auth.store import KeyRevoked
    from keel.cli import _fail
    from keel.observability.report import parse_window
    from keel.validation_errors import describe

    fields: dict[str, Any] = {name: value for name, value in (
        ("owner", owner), ("label", label), ("tier", tier), ("models", model or None), ("requests_per_minute", rpm),
        ("tokens_per_minute", tpm), ("max_concurrency", max_concurrency)) if value is not None}
    if budget_usd is not None:
        fields["budgets"] = [{"limit_usd": budget_usd, "window": budget_window}]
    for name in clear or ():
        if name not in CLEARABLE:
            raise _fail(f"--clear takes one of {', '.join(CLEARABLE)}, not '{name}'", 2)
        fields[CLEARABLE[name]] = None
    if not fields and expires_in is None:
        raise _fail("say what to change: --tier pro, --rpm 60, --clear tier, ... (keel keys update --help)", 2)
    try:
        if expires_in is not None:
            fields["expires_in_s"] = parse_window(expires_in)
        change = KeyChange.model_validate(fields)
    except ValidationError as exc:
        raise _fail(f"the change is invalid: {describe(exc, KeyChange)}", 2) from None
    except ValueError as exc:
        raise _fail(str(exc).replace("--since", "--expires-in"), 2) from None
    with _keys(config) as keys:
        try:
            key = keys.update(key_id, change.changes(time.time()))
        except KeyRevoked as exc:
            raise _fail(str(exc), 1) from None
    if key is None:
        raise _fail(f"there is no key '{key_id}'; `keel keys list` shows the keys", 1)
    if as_json:
        sys.stdout.write(orjson.dumps(key.public()).decode() + "\n")
        return
    Console(stderr=True).print(f"Changed key {key.id} of tenant '{key.tenant}'.", highlight=False)


@keys_app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (vk_...), from `keel keys list`")],
    config: ConfigOption = None,
) -> None:
    """Revoke a key: every gateway refuses it within a second."""
    from keel.cli import _fail

    with _keys(config) as keys:
        key = keys.revoke(key_id)
    if key is None:
        raise _fail(f"there is no key '{key_id}'; `keel keys list` shows the keys", 1)
    Console(stderr=True).print(f"Revoked key {key.id} of tenant '{key.tenant}'.", highlight=False)
