"""The texts of a chat request that guardrails read and may rewrite, each with where it came from.

Sources: `system` (system and developer messages), `user`, `assistant` (earlier turns), `tool` (tool
and function results) and `untrusted` (a message or text part the caller marked `"keel_untrusted":
true`: retrieved documents, web pages, e-mails). Tool results and untrusted content are checked for
indirect injection with their own policy. The marker is Keel's: it is removed before the request
goes upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from keel.types import ChatRequest, TextPart

Source = Literal["system", "user", "assistant", "tool", "untrusted"]
UNTRUSTED = "keel_untrusted"
_ROLE_SOURCE: dict[str, Source] = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant",
    "tool": "tool", "function": "tool",
}


@dataclass(slots=True)
class Piece:
    """One text of the request: a message's string content, or one of its text parts."""

    message: int  # index in request.messages
    source: Source
    text: str
    holder: Any  # the message (string content) or the text part
    attribute: str  # "content" or "text"

    def replace(self, text: str) -> None:
        setattr(self.holder, self.attribute, text)
        self.text = text


def pieces(request: ChatRequest) -> list[Piece]:
    """Every text of the request, in order; the `keel_untrusted` markers are taken off on the way."""
    return list(_walk(request))


def _walk(request: ChatRequest) -> Iterator[Piece]:
    for index, message in enumerate(request.messages):
        source = _ROLE_SOURCE.get(message.role, "user")
        if _take_marker(message):
            source = "untrusted"
        content = message.content
        if isinstance(content, str):
            yield Piece(index, source, content, message, "content")
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, TextPart):
                    yield Piece(index, "untrusted" if _take_marker(part) else source, part.text, part, "text")


def _take_marker(item: Any) -> bool:
    extra = getattr(item, "__pydantic_extra__", None)
    return bool(extra and extra.pop(UNTRUSTED, False))
