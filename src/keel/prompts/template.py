"""A prompt template: a name, a version, messages whose text holds Jinja variables, and optionally the
model route and the response schema it is meant for.

Rendering is sandboxed (a template cannot reach Python objects) and strict: a variable the template
uses and the caller did not give is an error naming it, never an empty string in the prompt. Values
are inserted as they are: prompts are not HTML, so nothing is escaped.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta
from jinja2.sandbox import SandboxedEnvironment

from keel.errors import InvalidRequest, KeelError

_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
ROLES = ("system", "developer", "user", "assistant")
_UNDEFINED = re.compile(r"'(\w+)' is undefined")


class PromptFileInvalid(Exception):
    """A prompt file cannot be used; the message says which file, which prompt and what to change."""


class PromptNotFound(KeelError):
    status = 404
    type = "invalid_request_error"
    code = "prompt_not_found"
    outcome: ClassVar[str] = "invalid"  # the caller's mistake


class MissingVariable(InvalidRequest):
    code = "missing_variable"


class PromptRenderFailed(InvalidRequest):
    code = "prompt_render_failed"


@dataclass(frozen=True, slots=True)
class PromptRef:
    """Which prompt a call was rendered from: the request log's `prompt` and `prompt_version`."""

    name: str
    version: str


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    name: str
    version: str
    messages: tuple[tuple[str, str], ...]  # (role, template text)
    model: str | None = None
    response_format: dict[str, Any] | None = None
    description: str | None = None
    variables: frozenset[str] = field(default=frozenset())  # every variable the messages use (some may have defaults)
    digest: str = ""  # sha256 of the template's content: two files with one version and other text differ

    @classmethod
    def of(cls, data: Any, where: str) -> PromptTemplate:
        """A template from one entry of a prompt file; `where` names the file for messages."""
        if not isinstance(data, dict):
            raise PromptFileInvalid(f"{where}: each prompt is a mapping with name, version and messages")
        unknown = set(data) - {"name", "version", "messages", "model", "response_format", "description"}
        if unknown:
            raise PromptFileInvalid(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a prompt has name, "
                                    "version, messages and optionally model, response_format, description")
        name, version = data.get("name"), data.get("version")
        if not isinstance(name, str) or not name.strip():
            raise PromptFileInvalid(f"{where}: a prompt needs a `name` (a string)")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        if not isinstance(version, str) or not version.strip():
            raise PromptFileInvalid(f"{where}: prompt {name!r} needs a `version` (a string or a number)")
        here = f"{where}: prompt {name!r} version {version}"
        messages = _messages(data.get("messages"), here)
        variables: set[str] = set()
        for i, (_, text) in enumerate(messages):
            try:
                variables |= meta.find_undeclared_variables(_ENV.parse(text))
            except TemplateSyntaxError as exc:
                raise PromptFileInvalid(f"{here}: messages[{i}] is not a valid template: {exc.message} "
                                        f"(line {exc.lineno})") from None
        model, response_format = data.get("model"), data.get("response_format")
        if model is not None and not isinstance(model, str):
            raise PromptFileInvalid(f"{here}: `model` is the name of a model of keel.yaml (a string)")
        if response_format is not None and not isinstance(response_format, dict):
            raise PromptFileInvalid(f"{here}: `response_format` is a mapping, as in a chat request")
        description = data.get("description")
        content = {"messages": messages, "model": model, "response_format": response_format}
        digest = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
        return cls(name, version, tuple(messages), model, response_format,
                   description if isinstance(description, str) else None, frozenset(variables), digest)

    @property
    def ref(self) -> PromptRef:
        return PromptRef(self.name, self.version)

    def render(self, variables: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat messages, with `variables` filled in; every missing variable is named at once (a
        variable used only through `default(...)` may be left out)."""
        values, missing = dict(variables), list[str]()
        while True:
            try:
                return self._render(values, missing)
            except UndefinedError as exc:
                found = _UNDEFINED.fullmatch(exc.message or "")
                if found is None or found[1] in missing or found[1] not in self.variables:
                    raise self._failed(exc) from None
                missing.append(found[1])
                values[found[1]] = ""  # to find the next one

    def _render(self, values: dict[str, Any], missing: list[str]) -> list[dict[str, Any]]:
        rendered = []
        for role, text in self.messages:
            try:
                rendered.append({"role": role, "content": _ENV.from_string(text).render(values)})
            except UndefinedError:
                raise
            except Exception as exc:  # a filter or an attribute that fails on the values given
                raise self._failed(exc) from None
        if missing:
            names = ", ".join(sorted(missing))
            raise MissingVariable(
                f"Prompt {self.name!r} version {self.version} needs the variable(s) {names}; send them in "
                f"`variables` (for example {{\"{sorted(missing)[0]}\": \"...\"}}).",
                param=f"variables.{sorted(missing)[0]}",
            )
        return rendered

    def _failed(self, exc: Exception) -> PromptRenderFailed:
        return PromptRenderFailed(
            f"Prompt {self.name!r} version {self.version} could not be rendered with the variables given "
            f"({type(exc).__name__}: {exc}). Check the variables' types against the template.",
            param="variables",
        )


def _messages(value: Any, here: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise PromptFileInvalid(f"{here}: `messages` is a list of {{role, content}} (at least one)")
    messages = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str) or set(message) - {"role", "content"}:
            raise PromptFileInvalid(
                f"{here}: messages[{i}] must be {{role: one of {', '.join(ROLES)}, content: text}}"
            )
        messages.append((role, content))
    return messages
