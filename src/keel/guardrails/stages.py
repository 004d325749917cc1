"""The guardrail stages of a `Keel`, as `keel.guardrails.build` made them (none when no model has any)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keel.guardrails.input_stage import InputGuardrails
    from keel.guardrails.output_stage import OutputGuardrails


@dataclass(slots=True)
class GuardrailStages:
    input: InputGuardrails | None
    output: OutputGuardrails | None
