"""The HTTP gateway."""

from keel.server.app import create_app

__all__ = ["create_app"]
