"""The re-ask: the request again, with the invalid answer and what is wrong with it appended, so the
model can correct itself rather than roll the dice again.

The invalid answer goes back as the assistant's message; tool calls get a tool message each (OpenAI
requires one after every call) carrying their errors; a user message lists the problems and asks for
an answer that conforms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keel.ids import random_hex
from keel.types import AssistantMessage, ChatRequest, FunctionCall, ToolCall, ToolMessage, UserMessage
from keel.validation.answer import Expectations

INSTRUCTION = (
    "Your previous answer was invalid:\n{problems}\n"
    "Answer the request again. {what} Reply with the corrected answer only."
)


def repair_request(request: ChatRequest, answer: Mapping[str, Any], problems: list[str],
                   expect: Expectations) -> ChatRequest:
    """`request` with the invalid `answer` (its assistant message) and the `problems` appended."""
    message = answer.get("message") or {}
    tool_calls = [_tool_call(tc) for tc in message.get("tool_calls") or ()]
    content = message.get("content")
    appended: list[Any] = [AssistantMessage(
        role="assistant", content=content if isinstance(content, str) else None, tool_calls=tool_calls or None,
    )]
    for tool_call in tool_calls:
        mine = [p for p in problems if f"({tool_call.function.name!r})" in p] or problems
        appended.append(ToolMessage(
            role="tool", tool_call_id=tool_call.id,
            content="Not run: the call is invalid. " + "; ".join(mine),
        ))
    listed = "\n".join(f"- {p}" for p in problems)
    appended.append(UserMessage(role="user", content=INSTRUCTION.format(problems=listed, what=_what(expect))))
    return request.model_copy(update={"messages": [*request.messages, *appended]})


def _what(expect: Expectations) -> str:
    if expect.tools and not expect.json_object:
        return "Call only the tools offered, with arguments that are JSON matching each tool's parameters schema."
    if expect.schema is not None:
        return "It must be JSON that conforms to the JSON schema given in response_format, with nothing around it."
    return "It must be a single JSON object, with nothing around it."


def _tool_call(raw: Mapping[str, Any]) -> ToolCall:
    function = raw.get("function") or {}
    return ToolCall(
        id=raw.get("id") or "call_" + random_hex(12), type="function",
        function=FunctionCall(name=str(function.get("name") or ""), arguments=str(function.get("arguments") or "")),
    )
