"""The auth stage, first inside observe: who is calling, and may they use this model.

A call the gateway received carries `ctx.credential` (the digest of its bearer token); one made
in-process carries none and is trusted. The master key passes everywhere; a virtual key must be
known, unexpired, unrevoked, and allowed the model. Refusals are 401 (`invalid_api_key`) and 403
(`model_not_allowed`), logged by observe like any call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from keel.auth.keys import KEY_PREFIX, Credential, VirtualKey, digest
from keel.auth.lookup import KeyLookup
from keel.errors import AuthenticationFailed, KeysUnavailable, ModelNotAllowed
from keel.observability.store import StoreError
from keel.pipeline import Call, Context, Next, Reply

MASTER_KEY_ID = "master"
SEND_KEY = "Send 'Authorization: Bearer <key>' with a key from `keel keys create` (or the gateway's master key)."


class Auth:
    def __init__(self, lookup: KeyLookup, master_key: str | None, clock: Callable[[], float] = time.time) -> None:
        self.lookup = lookup
        self._master = digest(master_key) if master_key else None
        self.clock = clock

    async def __call__(self, call: Call, next: Next) -> Reply:
        await self.admit(call.ctx, call.model.name)
        return await next(call)

    async def admit(self, ctx: Context, model: str) -> None:
        """Identify the caller into `ctx` (key, key_id, tenant), or refuse the call."""
        if ctx.credential is None:
            return
        key = await self.identify(ctx.credential)
        if key is None:
            ctx.key_id = MASTER_KEY_ID
            return
        ctx.key, ctx.key_id, ctx.tenant = key, key.id, key.tenant
        if not key.allows(model):
            allowed = ", ".join(key.models or ())
            raise ModelNotAllowed(
                f"This key may not use the model '{model}'. Its models: {allowed}. Ask your administrator "
                "for a key that allows it.", param="model",
            )

    async def identify(self, credential: Credential) -> VirtualKey | None:
        """The caller's key; None for the master key. Raises AuthenticationFailed."""
        if credential.digest is None:
            raise AuthenticationFailed(f"No API key was sent. {SEND_KEY}")
        if self._master is not None and credential.matches(self._master):
            return None
        if not credential.well_formed:
            raise AuthenticationFailed(
                f"The API key is not in Keel's format (keys start with '{KEY_PREFIX}' followed by 43 "
                f"letters, digits, '-' or '_'). {SEND_KEY}"
            )
        try:
            key = await self.lookup.find(credential.digest)
        except StoreError as exc:
            raise KeysUnavailable(
                f"The gateway cannot check API keys right now ({exc}). Try again in a moment."
            ) from None
        if key is None or not credential.matches(key.digest):
            raise AuthenticationFailed(f"The API key is not known here. {SEND_KEY}")
        if key.revoked_at is not None:
            raise AuthenticationFailed(f"The API key {key.id} was revoked. Ask your administrator for a new one.")
        if not key.usable(self.clock()):
            raise AuthenticationFailed(f"The API key {key.id} has expired. Ask your administrator for a new one.")
        return key
