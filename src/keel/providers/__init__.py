"""Providers: the OpenAI-compatible HTTP client, Anthropic, the embedded model, the simulator."""

from keel.providers.base import ChatOnly, Deployment, Provider, deployment_name, make_provider

__all__ = ["ChatOnly", "Deployment", "Provider", "deployment_name", "make_provider"]
