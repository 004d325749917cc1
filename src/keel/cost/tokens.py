"""Token counts estimated locally, for when an upstream reports none (and for reservations).

An estimate, never a count: it errs high, so a budget reservation covers the real bill.
Roughly: lower-case letters and spaces at 3 characters a token (tokenizers average about 4
on English), capitals at 2, every digit and punctuation mark a token of its own, other
characters at two tokens per three UTF-8 bytes, plus a few tokens of framing per message
and per tool. Random strings (base64, hashes) can take more than this counts; no cheap rule
bounds every tokenizer short of one token per byte. An
image or another non-text part counts as IMAGE_TOKENS, a high-detail image's order of
magnitude; some models report images at many times that (gpt-4o-mini), which the settled
cost, taken from the upstream's usage, corrects.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping
from typing import Any

from keel.types import (
    AssistantMessage,
    ChatRequest,
    EmbeddingRequest,
    RefusalPart,
    TextPart,
)

PER_MESSAGE = 4  # role and separators around each message
PER_REQUEST = 3  # the primer of the assistant's reply
PER_TOOL = 8  # framing of each tool definition or tool call
IMAGE_TOKENS = 1600

_SINGLES = (string.digits + string.punctuation).encode()
_UPPER = string.ascii_uppercase.encode()
_NON_ASCII = bytes(range(128, 256))


def text_tokens(text: str) -> int:
    """A conservative token count of a piece of text (a few C-speed passes over its bytes)."""
    if not text:
        return 0
    data = text.encode("utf-8", "surrogatepass")
    singles = len(data) - len(data.translate(None, _SINGLES))
    upper = len(data) - len(data.translate(None, _UPPER))
    other = len(data) - len(data.translate(None, _NON_ASCII))
    rest = len(data) - singles - upper - other
    return singles + math.ceil(upper / 2) + math.ceil(rest / 3) + math.ceil(other * 2 / 3)


def prompt_tokens(request: ChatRequest | EmbeddingRequest) -> int:
    """An estimate of the prompt tokens an upstream will bill for a request."""
    if isinstance(request, EmbeddingRequest):
        return _embedding_input_tokens(request.input)
    tokens = PER_REQUEST
    for message in request.messages:
        tokens += PER_MESSAGE + _content_tokens(message.content)
        name = getattr(message, "name", None)
        if name:
            tokens += 1 + text_tokens(str(name))
        if isinstance(message, AssistantMessage):
            tokens += text_tokens(message.refusal or "")
            for call in message.tool_calls or ():
                tokens += PER_TOOL + text_tokens(call.function.name) + text_tokens(call.function.arguments)
            if message.function_call is not None:
                tokens += PER_TOOL + text_tokens(message.function_call.name + message.function_call.arguments)
    for tool in request.tools or ():
        tokens += PER_TOOL + text_tokens(tool.function.model_dump_json(exclude_none=True))
    if request.response_format is not None and request.response_format.type == "json_schema":
        tokens += PER_TOOL + text_tokens(request.response_format.model_dump_json(exclude_none=True))
    return tokens


def completion_tokens(message: Mapping[str, Any] | None) -> int:
    """An estimate of the completion tokens of an assistant message (a chat.completion's)."""
    if not message:
        return 0
    tokens = text_tokens(message.get("content") or "") + text_tokens(message.get("refusal") or "")
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        tokens += PER_TOOL + text_tokens(function.get("name") or "") + text_tokens(function.get("arguments") or "")
    return tokens


def _content_tokens(content: str | list[Any] | None) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return text_tokens(content)
    tokens = 0
    for part in content:
        if isinstance(part, TextPart):
            tokens += text_tokens(part.text)
        elif isinstance(part, RefusalPart):
            tokens += text_tokens(part.refusal)
        else:
            tokens += IMAGE_TOKENS
    return tokens


def _embedding_input_tokens(value: str | list[str] | list[int] | list[list[int]]) -> int:
    if isinstance(value, str):
        return text_tokens(value)
    tokens = 0
    for item in value:
        if isinstance(item, str):
            tokens += text_tokens(item)
        elif isinstance(item, list):
            tokens += len(item)
        else:
            tokens += 1  # one token id
    return tokens
