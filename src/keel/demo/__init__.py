"""`keel demo`: a realistic mix of traffic through a running gateway, with the official openai client, so
the dashboard has something to show (docs/demo.md).

Each step is one kind of traffic with a known outcome: chats and streams across features and users, a
cache hit, a blocked prompt injection, a redacted email, a budget refusal, a failing deployment with its
fallback, and an eval run through the gateway. A step whose feature the gateway's config lacks says
"skipped: <what to configure>"; examples/demo.yaml has everything the mix needs.
"""

from keel.demo.run import DemoSettings, run_demo
from keel.demo.steps import StepResult

__all__ = ["DemoSettings", "StepResult", "run_demo"]
