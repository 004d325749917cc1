"""Structured outputs: JSON answers and tool calls checked against the caller's schemas, re-asked
when invalid, refused (422 `invalid_output`) rather than passed on (docs/structured-outputs.md);
`response_model` for the library's `chat` (a pydantic model class as the answer's shape)."""

from keel.validation.response_model import response_format_for, strict_schema
from keel.validation.schema import SchemaCache
from keel.validation.stage import Validation

__all__ = ["SchemaCache", "Validation", "response_format_for", "strict_schema"]
