"""A chat request that names a prompt, turned into the request the pipeline runs: the template's
messages rendered with the caller's variables, then the caller's own messages; the template's model
and response format unless the caller gave its own.

The prompt is named by the `x-keel-prompt` header (`name` or `name@version`), by `metadata.prompt` and
`metadata.prompt_version`, or, in the library, by `prompt=` and `prompt_version=`. Variables come in
the request's `variables` object (a Keel field: with the OpenAI SDK, `extra_body={"variables": {...}}`),
which is removed before the request goes upstream.
"""

from __future__ import annotations

from typing import Any

from keel.errors import InvalidRequest
from keel.prompts.registry import PromptRegistry
from keel.prompts.template import PromptNotFound, PromptRef

PROMPT_HEADER = "x-keel-prompt"


def named_prompt(params: dict[str, Any], header: str | None = None) -> tuple[str, str | None] | None:
    """(name, version or None) of the prompt a request names, or None when it names none."""
    if header:
        named, _, at = header.strip().partition("@")
        return named.strip(), at.strip() or None
    name: Any = params.pop("prompt", None)
    version: Any = params.pop("prompt_version", None)
    metadata = params.get("metadata")
    if name is None and isinstance(metadata, dict):
        name, version = metadata.get("prompt"), metadata.get("prompt_version")
    if name is None:
        return None
    if not isinstance(name, str) or not name or (version is not None and not isinstance(version, str | int)):
        raise InvalidRequest("A prompt is named by a string (and its version by a string), e.g. "
                             "metadata: {\"prompt\": \"summarise\", \"prompt_version\": \"2\"}.", param="prompt")
    return name, None if version is None else str(version)


def apply_prompt(
    params: dict[str, Any], registry: PromptRegistry | None, *, header: str | None = None, caller: str | None = None,
) -> PromptRef | None:
    """Render the prompt `params` names into `params` (in place); its ref, or None when it names none."""
    named = named_prompt(params, header)
    variables = params.pop("variables", None)
    if named is None:
        if variables is not None:
            raise InvalidRequest("The request sends `variables` but names no prompt; name one with the x-keel-prompt "
                                 "header or metadata.prompt.", param="variables")
        return None
    if registry is None:
        raise PromptNotFound(f"There is no prompt {named[0]!r}: this gateway has no prompts (set prompts.dir in "
                             "keel.yaml).", param="prompt")
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        raise InvalidRequest("`variables` is an object of the prompt's variables, e.g. {\"text\": \"...\"}.",
                             param="variables")
    template = registry.get(*named, caller=caller)
    extra = params.get("messages") or []
    if not isinstance(extra, list):
        raise InvalidRequest("`messages` is a list; with a prompt, its messages come after the prompt's.",
                             param="messages")
    params["messages"] = [*template.render(variables), *extra]
    if not params.get("model"):
        if template.model is None:
            raise InvalidRequest(f"Prompt {template.name!r} version {template.version} names no model; send `model`.",
                                 param="model")
        params["model"] = template.model
    if template.response_format is not None and params.get("response_format") is None:
        params["response_format"] = template.response_format
    return template.ref
