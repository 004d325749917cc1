"""What a call costs: the price of the model that answered, times the tokens it billed.

Prices are USD per 1M tokens (`keel.config.Price`). The built-in table below holds the
list prices of common hosted models; keel.yaml's `pricing:` entries override it by model
name, and a deployment's `price:` overrides both for that deployment. Local and simulated
deployments cost nothing unless keel.yaml gives them a price. A hosted model with no price
anywhere costs 0 and is flagged, with one warning per model: budgets cannot limit it.

Costs are computed in whole nano-dollars (see `keel.cost.money`), rounded up once per call.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from keel.config import Price
from keel.cost.money import Nanos, to_usd
from keel.providers.base import deployment_name

if TYPE_CHECKING:
    from keel.config import Deployment as DeploymentConfig
    from keel.config import KeelConfig

log = logging.getLogger("keel.cost")

# The date these list prices were last compared with the providers' pricing pages
# (https://openai.com/api/pricing, https://www.anthropic.com/pricing). Providers change
# prices without notice: re-check them before relying on a figure, and override any entry
# in keel.yaml (`pricing:`). Standard tier only: no batch or flex discounts, no long-context
# surcharges (Claude Sonnet 4 over 200k prompt tokens), no Anthropic cache-write premium
# (cache writes are billed here at the input price, cache reads at `cached_input`).
CHECKED = "2025-08-15"


def _p(input: float, output: float, cached_input: float | None = None) -> Price:
    return Price(input=input, output=output, cached_input=cached_input)


BUILT_IN: dict[str, Price] = {
    # OpenAI
    "gpt-5": _p(1.25, 10.00, 0.125),
    "gpt-5-mini": _p(0.25, 2.00, 0.025),
    "gpt-5-nano": _p(0.05, 0.40, 0.005),
    "gpt-4.1": _p(2.00, 8.00, 0.50),
    "gpt-4.1-mini": _p(0.40, 1.60, 0.10),
    "gpt-4.1-nano": _p(0.10, 0.40, 0.025),
    "gpt-4o": _p(2.50, 10.00, 1.25),
    "gpt-4o-mini": _p(0.15, 0.60, 0.075),
    "o1": _p(15.00, 60.00, 7.50),
    "o1-mini": _p(1.10, 4.40, 0.55),
    "o3": _p(2.00, 8.00, 0.50),
    "o3-mini": _p(1.10, 4.40, 0.55),
    "o4-mini": _p(1.10, 4.40, 0.275),
    "gpt-4-turbo": _p(10.00, 30.00),
    "gpt-4": _p(30.00, 60.00),
    "gpt-3.5-turbo": _p(0.50, 1.50),
    "text-embedding-3-small": _p(0.02, 0.0),
    "text-embedding-3-large": _p(0.13, 0.0),
    "text-embedding-ada-002": _p(0.10, 0.0),
    # Anthropic (cache reads at a tenth of the input price)
    "claude-opus-4-1": _p(15.00, 75.00, 1.50),
    "claude-opus-4": _p(15.00, 75.00, 1.50),
    "claude-sonnet-4-5": _p(3.00, 15.00, 0.30),
    "claude-sonnet-4": _p(3.00, 15.00, 0.30),
    "claude-3-7-sonnet": _p(3.00, 15.00, 0.30),
    "claude-3-5-sonnet": _p(3.00, 15.00, 0.30),
    "claude-haiku-4-5": _p(1.00, 5.00, 0.10),
    "claude-3-5-haiku": _p(0.80, 4.00, 0.08),
    "claude-3-haiku": _p(0.25, 1.25, 0.03),
    "claude-3-opus": _p(15.00, 75.00, 1.50),
}

FREE = _p(0.0, 0.0)
_UNBILLED = ("local", "local-embedder", "simulated")  # run by Keel itself: no upstream bill
# What may follow a known name in a returned one: a date or version suffix (gpt-4o-mini-2024-07-18,
# gpt-3.5-turbo-0125, claude-3-5-sonnet-20241022, claude-sonnet-4@20250514, claude-sonnet-4-0,
# -latest). Anything else (o3-pro, gpt-4-32k) is another model, with another price: unknown.
_VERSION_SUFFIX = re.compile(r"(?:[-@:](?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|0|latest|v\d+(?::\d+)?))+")


class PricingTable:
    """Built-in prices, under keel.yaml's `pricing:`, under each deployment's `price:`.

    Built at start-up (keel.config has refused negative and infinite prices already);
    deployments with no known price are warned about.
    """

    def __init__(self, config: KeelConfig | None = None, *, built_in: Mapping[str, Price] = BUILT_IN) -> None:
        configured = dict(config.pricing) if config is not None else {}
        self.configured = {name.lower(): price for name, price in configured.items()}
        self.table = {**{name.lower(): price for name, price in built_in.items()}, **self.configured}
        self._warned: set[str] = set()
        self._found: dict[tuple[str, bool], Price | None] = {}  # a few names, looked up on every call
        for model in config.models if config is not None else ():
            for dep in model.deployments:
                self.for_deployment(dep)  # an unpriced model is warned about at start-up, not at its first call

    def lookup(self, model: str, *, configured_only: bool = False) -> Price | None:
        """The price of a model name as an upstream returns it: exact, else the longest known
        name it starts with followed by a date or version suffix; a "vendor/" prefix is ignored.
        `configured_only` looks in keel.yaml's `pricing:` alone."""
        memo = (model, configured_only)
        if memo not in self._found:
            if len(self._found) > 1024:  # names come from the upstreams: a few, unless one misbehaves
                self._found.clear()
            self._found[memo] = _longest_match(self.configured if configured_only else self.table, model)
        return self._found[memo]

    def for_deployment(self, deployment: DeploymentConfig, returned_model: str | None = None) -> Price | None:
        """The price of one deployment's answer: its own `price:`, else the table's entry for the
        model it returned or is configured with; None (and one warning) when there is none."""
        if deployment.price is not None:
            return deployment.price
        configured_model: str | None = getattr(deployment, "model", None)
        names = [n for n in (returned_model, configured_model) if n]
        unbilled = deployment.provider in _UNBILLED
        for name in names:
            price = self.lookup(name, configured_only=unbilled)
            if price is not None:
                return price
        if unbilled:
            return FREE
        self._warn_unpriced(deployment, names)
        return None

    def _warn_unpriced(self, deployment: DeploymentConfig, names: list[str]) -> None:
        label = names[0] if names else deployment.provider
        if label in self._warned:
            return
        self._warned.add(label)
        log.warning(
            "no price known for model '%s' (deployment '%s'): its calls are logged as costing 0 USD and "
            "budgets cannot limit them; add it under 'pricing:' in keel.yaml or set the deployment's 'price:'",
            label, deployment_name(deployment),
        )


def _longest_match(table: Mapping[str, Price], model: str) -> Price | None:
    name = model.strip().lower()
    for candidate in dict.fromkeys((name, name.rpartition("/")[2])):
        if candidate in table:
            return table[candidate]
        known = [k for k in table if candidate.startswith(k) and _VERSION_SUFFIX.fullmatch(candidate[len(k):])]
        if known:
            return table[max(known, key=len)]
    return None


def cost_nanos(usage: Mapping[str, Any], price: Price) -> Nanos:
    """What an OpenAI-shaped usage object costs at a price, in nano-dollars, rounded up.

    `prompt_tokens` counts every prompt token; `prompt_tokens_details.cached_tokens` of them
    are billed at `cached_input` (the input price when it has none). The Anthropic provider
    already reports its usage this way (cache reads and writes inside prompt_tokens).
    Reasoning tokens are inside `completion_tokens` and billed as output.
    """
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    cached = min(prompt, int(details.get("cached_tokens") or 0)) if isinstance(details, Mapping) else 0
    rate_in, rate_cached, rate_out = _rates(price)
    total = (prompt - cached) * rate_in + cached * rate_cached + completion * rate_out
    return -(-total // _RATE_SCALE)  # integer arithmetic, rounded up once


def cost(usage: Mapping[str, Any], price: Price) -> float:
    """`cost_nanos` in USD."""
    return to_usd(cost_nanos(usage, price))


# A price as integer rates: 1e-6 nano-dollars per token, exact for prices written with up to
# nine decimals (USD per 1M tokens is 1000 nano-dollars per token per USD of price).
_RATE_SCALE = 1_000_000
_RATES: dict[int, tuple[Price, tuple[int, int, int]]] = {}  # by id(price); prices are few and long-lived


def _rates(price: Price) -> tuple[int, int, int]:
    known = _RATES.get(id(price))
    if known is not None and known[0] is price:
        return known[1]
    cached_input = price.cached_input if price.cached_input is not None else price.input
    rates = (_rate(price.input), _rate(cached_input), _rate(price.output))
    if len(_RATES) > 4096:
        _RATES.clear()
    _RATES[id(price)] = (price, rates)
    return rates


def _rate(usd_per_million: float) -> int:
    # The price as written in keel.yaml (its shortest repr), not its binary float; rounded up.
    return math.ceil(Decimal(str(usd_per_million)) * 1000 * _RATE_SCALE)

