"""The balance strategy: spread calls over the deployments of one tier.

Each call goes first to the deployment with the lowest expected wait: (calls in flight + 1) times
its recent latency (an exponentially weighted moving average), divided by its weight. Deployments
whose breaker is open (cooling down after failures) go last, so the reliability stage skips them
without a try; the others stay behind the first as fallbacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from keel.pipeline import Attempt, Call
from keel.providers.base import Deployment
from keel.routing.route import Choice, Tier


@dataclass(slots=True)
class DeploymentLoad:
    in_flight: int = 0
    latency_s: float | None = None  # moving average of answered attempts; None: never measured


class LoadBalance:
    """Orders a tier's deployments for each call, and learns from how calls went."""

    def __init__(self, weights: Mapping[str, float] | None = None, halflife: int = 20) -> None:
        self.weights = dict(weights or {})
        self.alpha = 1 - 0.5 ** (1 / halflife)  # a sample's weight after `halflife` more counts half
        self.loads: dict[str, DeploymentLoad] = {}

    def load(self, name: str) -> DeploymentLoad:
        return self.loads.setdefault(name, DeploymentLoad())

    def expected_wait(self, deployment: Deployment, unmeasured: float) -> float:
        """In-flight calls and one more, at the deployment's latency (`unmeasured` when it has none yet),
        over its weight."""
        load = self.load(deployment.name)
        latency = load.latency_s if load.latency_s is not None else unmeasured
        return (load.in_flight + 1) * max(latency, 1e-6) / self.weights.get(deployment.name, 1.0)

    def order(self, deployments: Sequence[Deployment]) -> list[Deployment]:
        """Closed breakers first, by expected wait (ties keep the configured order); open ones last."""
        # Unmeasured: as fast as the fastest known, so a new deployment gets tried.
        fastest = min((x.latency_s for x in self.loads.values() if x.latency_s is not None), default=1.0)
        return sorted(deployments, key=lambda d: (d.breaker.retry_in() > 0, self.expected_wait(d, fastest)))

    def started(self, name: str) -> None:
        self.load(name).in_flight += 1

    def finished(self, name: str, attempts: Iterable[Attempt]) -> None:
        """The call sent first to `name` is over; answered attempts update their deployment's latency."""
        load = self.load(name)
        load.in_flight = max(0, load.in_flight - 1)
        for attempt in attempts:
            if attempt.error is None and attempt.ended:
                measured = self.load(attempt.deployment)
                sample = attempt.ended - attempt.started
                previous = measured.latency_s
                measured.latency_s = sample if previous is None else previous + self.alpha * (sample - previous)

    async def decide(self, call: Call, tiers: Sequence[Tier]) -> Choice:
        return Choice(0, "balance")
