"""Tiered routing: virtual models (`auto`) whose calls go to the cheapest tier that does them well.

One module per decision, as tenacity splits stop, wait and retry: `rules`, `complexity`, `cascade`,
`balance`, `budget`; `stage` applies them to a call (docs/routing.md).
"""

from keel.routing.route import Choice, Route, Strategy, Tier

__all__ = ["Choice", "Route", "Strategy", "Tier"]
