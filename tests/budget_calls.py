"""What budget tests build again and again: a rule, a model, a call, and a clock they move."""

from __future__ import annotations

import time
from typing import Any

from keel.config import BudgetConfig, KeelConfig, parse_config
from keel.pipeline import Call, Context
from keel.types import ChatRequest


class Clock:
    """Budgets' clock (Unix time), moved by the test; it starts now unless told otherwise."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def rule(**fields: Any) -> BudgetConfig:
    return BudgetConfig.model_validate({"limit_usd": 1.0, **fields})


def model_config(**model: Any) -> KeelConfig:
    """Model "m" on a simulated deployment priced at 1000 USD per 1M tokens each way."""
    deployment = {"provider": "simulated", "model": "sim", "price": {"input": 1000, "output": 1000}}
    return parse_config({"models": [{"name": "m", "deployments": [deployment], **model}]})


def call_for(ctx: Context | None = None, cfg: KeelConfig | None = None) -> Call:
    cfg = cfg or model_config()
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    return Call(request, cfg.models[0], [], ctx or Context())
