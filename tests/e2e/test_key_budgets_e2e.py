"""Acceptance: a virtual key's own budget, through `keel serve` with virtual keys on.

Two keys from `keel keys create`, one with a tiny daily budget of its own: through the official
openai SDK, that key is answered until its budget is spent, then refused with a 429
`budget_exceeded` that names the key's budget, while the other key is still served.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import GatewayProcess
from test_keys_e2e import MASTER, MESSAGES, client, create_key

BUDGET_USD = 0.03  # a call costs up to about 0.01 USD at this price and max_tokens: a few calls


def test_a_key_is_refused_once_its_own_budget_is_spent_while_another_key_is_served(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    deployment = {"provider": "simulated", "model": "sim", "price": {"input": 1000, "output": 1000}}
    config: dict[str, Any] = {"models": [{"name": "chat", "deployments": [deployment]}],
                              "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}"}, "auth": {"virtual_keys": True}}
    capped = create_key(config, tmp_path, "--tenant", "team-a", "--budget-usd", str(BUDGET_USD),
                        "--budget-window", "day")
    other = create_key(config, tmp_path, "--tenant", "team-a")
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})

    answered = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(20):  # a bound to fail on: the budget fits about three calls
            client(gw, capped).chat.completions.create(model="chat", messages=MESSAGES, max_tokens=5)
            answered += 1
    assert 1 <= answered < 20
    error = refused.value
    assert error.status_code == 429 and error.code == "budget_exceeded"
    keys = httpx.get(gw.url + "/admin/keys", headers={"authorization": f"Bearer {MASTER}"}).json()["data"]
    [capped_id] = [k["id"] for k in keys if k["budgets"] == [{"limit_usd": BUDGET_USD, "window": "day"}]]
    assert "Budget exceeded: the daily budget (" in error.message
    assert f"of key '{capped_id}', {BUDGET_USD} USD, has " in error.message
    assert error.response.headers["x-should-retry"] == "false"

    for _ in range(3):  # the other key, on no budget of its own, is still served
        answer = client(gw, other).chat.completions.create(model="chat", messages=MESSAGES, max_tokens=5)
        assert answer.choices[0].message.content
    with pytest.raises(openai.RateLimitError):  # and the capped key stays refused
        client(gw, capped).chat.completions.create(model="chat", messages=MESSAGES, max_tokens=5)

    # The admin view lists the key's own budget beside the rules, with what it has spent.
    shown = httpx.get(gw.url + "/admin/budgets", headers={"authorization": f"Bearer {MASTER}"}).json()["data"]
    [own] = [entry for entry in shown if entry["source"] == "key"]
    assert (own["id"], own["tenant"], own["rule"]["limit_usd"]) == (capped_id, "team-a", BUDGET_USD)
    [counter] = own["counters"]
    assert 0 < counter["spent_usd"] <= BUDGET_USD and counter["reserved_usd"] == 0
