"""Structured outputs: JSON answers and tool calls checked against the caller's schemas, re-asked
when invalid, refused (422 `invalid_output`) rather than passed on (docs/structured-outputs.md)."""

from keel.validation.schema import SchemaCache
from keel.validation.stage import Validation

__all__ = ["SchemaCache", "Validation"]
