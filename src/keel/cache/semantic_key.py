"""What the semantic cache compares: the last user turn's text, embedded, within a scope that holds
everything else that determines the answer.

Only the wording of the last user turn may differ between two requests that share an answer. The scope
is a hash of the rest, as the exact cache's key hashes a whole request: tenant, model, every earlier
message (the system prompt first), tools, response_format and the sampling parameters. So "What's the
capital of France?" and "Tell me France's capital" may share an answer under the same system prompt, and
never under another one, nor in another tenant, nor with another temperature or max_tokens.
"""

from __future__ import annotations

from keel.cache.key import answer_fields, scoped_key
from keel.cache.semantic_store import SCOPE_VERSION
from keel.types import ChatRequest, TextPart, UserMessage


def semantic_query(request: ChatRequest) -> str | None:
    """The text the semantic cache embeds: the last message, when it is a user turn of text only
    (an image or audio part has no text that could stand for it); else None, and the cache stays out."""
    last = request.messages[-1]
    if not isinstance(last, UserMessage):
        return None
    if isinstance(last.content, str):
        text = last.content
    elif all(isinstance(part, TextPart) for part in last.content):
        text = "\n".join(part.text for part in last.content if isinstance(part, TextPart))
    else:
        return None
    return text if text.strip() else None


def semantic_scope(request: ChatRequest, tenant: str | None, vectors: str = "") -> str:
    """`s1:<tenant>:<model>:<sha256>` of the request's answer-determining fields but the last user turn's
    content, and the caller's tenant. `vectors` names the embedder's vectors when they are not the exact
    model's (the quantized default: `keel.embedding.quantize.RECIPE`): entries stored with other vectors are
    in another scope, never compared with these (their cosines differ by up to ~0.03, the threshold's order)."""
    fields = answer_fields(request)
    last = dict(fields["messages"][-1])
    last.pop("content", None)  # the part that is compared by meaning; its name (a `name` field) stays
    fields["messages"] = [*fields["messages"][:-1], last]
    if vectors:
        fields["vectors"] = vectors
    return scoped_key(SCOPE_VERSION, fields, request.model, tenant)
