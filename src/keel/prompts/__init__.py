"""Prompt templates and their versions (docs/prompts.md): rendered in the library and the gateway, each
call's prompt and version recorded in the request log, A/B splits between versions."""

from keel.prompts.apply import PROMPT_HEADER, apply_prompt
from keel.prompts.registry import PromptRegistry
from keel.prompts.template import MissingVariable, PromptFileInvalid, PromptNotFound, PromptRef, PromptTemplate

__all__ = ["PROMPT_HEADER", "MissingVariable", "PromptFileInvalid", "PromptNotFound", "PromptRef", "PromptRegistry",
           "PromptTemplate", "apply_prompt"]
