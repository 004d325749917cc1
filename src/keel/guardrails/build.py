"""The guardrail stages of a keel.yaml: each model's input and output checks, built once. A model's
own `guardrails.input` or `guardrails.output` replaces the top-level section; a model with neither
is not checked and pays nothing for it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from keel.config import InputGuardrailsConfig, KeelConfig, OutputGuardrailsConfig, PiiConfig
from keel.guardrails.answer_checks import AnswerChecks, Ask
from keel.guardrails.injection import InjectionDetector
from keel.guardrails.injection_policy import InjectionPolicy
from keel.guardrails.input_stage import InputGuardrails, InputPolicy
from keel.guardrails.length import TokenCounter
from keel.guardrails.output_stage import OutputGuardrails
from keel.guardrails.pii_policy import PiiPolicy
from keel.guardrails.stages import GuardrailStages

if TYPE_CHECKING:
    from keel.embedding.shared import SharedEmbedder


def build_guardrails(
    config: KeelConfig, ask: Ask, shared: Callable[[], SharedEmbedder],
    counters: Mapping[str, TokenCounter] | None = None,
) -> GuardrailStages:
    """`shared`: the `Keel`'s one local embedder, asked for only when a check needs it. `counters`: by
    model name, the token counter of a model whose deployments have a tokenizer."""
    inputs: dict[str, InputPolicy] = {}
    outputs: dict[str, AnswerChecks] = {}
    pii_policies: dict[int, PiiPolicy] = {}  # one scanner per distinct pii section
    detectors: dict[bool, InjectionDetector] = {}

    def pii(section: PiiConfig) -> PiiPolicy:
        if id(section) not in pii_policies:
            pii_policies[id(section)] = PiiPolicy(section, "input")
        return pii_policies[id(section)]

    for model in config.models:
        own = model.guardrails
        input_config: InputGuardrailsConfig | None = own.input if own and own.input else config.guardrails.input
        output_config: OutputGuardrailsConfig | None = (
            own.output if own and own.output else config.guardrails.output
        )
        if input_config is not None:
            injection = None
            if (section := input_config.injection) is not None:
                classifier = "classifier" in section.layers
                if classifier not in detectors:
                    detectors[classifier] = InjectionDetector(shared() if classifier else None)
                injection = InjectionPolicy(section, detectors[classifier], ask)
            inputs[model.name] = InputPolicy(
                input_config, pii(input_config.pii) if input_config.pii else None, injection,
                (counters or {}).get(model.name),
            )
        if output_config is not None:
            outputs[model.name] = AnswerChecks(
                output_config, shared() if output_config.off_topic else None, ask
            )
    return GuardrailStages(
        InputGuardrails(inputs) if inputs else None, OutputGuardrails(outputs) if outputs else None
    )
