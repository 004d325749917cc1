"""Anthropic's Messages API at the edge: a `POST /v1/messages` body in, the one internal call (a chat
request's parameters) out; a chat.completion in, Anthropic's `message` out; any Keel error as
Anthropic's error body.

Plain dicts all the way (the chat request is parsed once, by the caller): the translation is on the
hot path and must cost next to nothing beside a chat call.

Fields only Anthropic can honour (`thinking`, server tools, document blocks, `mcp_servers`, ...)
are refused with a 400 naming the field, unless every deployment that may answer is Anthropic's
(`native`): then the client's own body is what goes upstream (docs/messages-api.md, "Passthrough"),
and `Translation.needs_native` names the first such field, so the provider knows it cannot fall back
to the translation without losing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from keel.errors import InvalidRequest, KeelError, NotSupported

Block = dict[str, Any]

# Top-level fields the translation carries, or may leave out without changing what the answer says.
TRANSLATED = frozenset({
    "model", "messages", "system", "max_tokens", "stop_sequences", "stream", "temperature", "top_p",
    "tools", "tool_choice", "metadata",
})
# Sampling and capacity hints with no chat counterpart: passed through to Anthropic deployments,
# left out of the translation for the others (they shape how an answer is drawn, not what is asked).
HINTS = frozenset({"top_k", "service_tier"})

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}

# Anthropic's error types by HTTP status (the SDK picks its exception class by status; the type tells
# the rest); 5xx other than these are `api_error`.
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}


@dataclass(slots=True)
class Translation:
    """A Messages body as chat request parameters. `needs_native`: the first field only an Anthropic
    deployment can carry (passthrough), or None when the translation says everything."""

    params: dict[str, Any]
    needs_native: str | None


# ---------------------------------------------------------------------------- request: Anthropic → chat


def chat_params(body: Any, *, native: bool) -> Translation:
    """The chat request parameters for a Messages body. `native`: every deployment that may answer is
    Anthropic's, so Anthropic-only fields are allowed (they travel in the client's own body)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object ({...}) as Anthropic's Messages API takes.")
    edge = _Edge(native)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Missing required parameter 'model': name the model to answer, as a string.",
                             param="model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise InvalidRequest("Missing required parameter 'max_tokens': the Messages API needs a cap on the "
                             "answer's length, e.g. \"max_tokens\": 1024.", param="max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        raise InvalidRequest(f"Invalid value for 'max_tokens': expected an integer of at least 1, got "
                             f"{_shown(max_tokens)}.", param="max_tokens")
    messages: list[dict[str, Any]] = []
    if (system := body.get("system")) is not None:
        messages.append({"role": "system", "content": _system(system)})
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise InvalidRequest("Invalid value for 'messages': expected a non-empty array of user and assistant "
                             "turns.", param="messages")
    for i, turn in enumerate(turns):
        edge.turn(turn, i, messages)
    params: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    for key, value in body.items():
        if key in TRANSLATED or key in HINTS or value is None:
            continue
        if key == "thinking" and isinstance(value, dict) and value.get("type") == "disabled":
            continue
        edge.anthropic_only(key)
    if (stop := body.get("stop_sequences")) is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("Invalid type for 'stop_sequences': expected an array of strings.",
                                 param="stop_sequences")
        if stop:
            params["stop"] = stop
    for key in ("temperature", "top_p"):
        if (value := body.get(key)) is not None:
            if type(value) not in (int, float) or not 0 <= value <= 1:
                raise InvalidRequest(f"Invalid value for '{key}': expected a number from 0 to 1, got "
                                     f"{_shown(value)}.", param=key)
            params[key] = value
    if (metadata := body.get("metadata")) is not None:
        if not isinstance(metadata, dict):
            raise InvalidRequest("Invalid type for 'metadata': expected an object.", param="metadata")
        if (user := metadata.get("user_id")) is not None:
            if not isinstance(user, str):
                raise InvalidRequest("Invalid type for 'metadata.user_id': expected a string.",
                                     param="metadata.user_id")
            params["user"] = user
    if (tools := body.get("tools")) is not None:
        if chat_tools := edge.tools(tools):
            params["tools"] = chat_tools
    if (choice := body.get("tool_choice")) is not None and params.get("tools"):
        _tool_choice(choice, params)
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise InvalidRequest(f"Invalid type for 'stream': expected a boolean, got {_shown(stream)}.", param="stream")
    if stream:
        # Usage ends the stream's message_delta: ask the pipeline for it whatever the client said.
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
    return Translation(params, edge.needs_native)


class _Edge:
    """One translation's state: whether Anthropic-only content may pass, and the first that did."""

    __slots__ = ("native", "needs_native")

    def __init__(self, native: bool) -> None:
        self.native = native
        self.needs_native: str | None = None

    def anthropic_only(self, param: str, what: str | None = None) -> None:
        """Note a field only an Anthropic deployment can take; refuse it when none answers."""
        if not self.native:
            raise NotSupported(
                f"'{param}' {what or 'is a field only Anthropic deployments take'}, and the model named here is "
                "not served by Anthropic deployments only. Remove it, or call a model whose deployments are all "
                "'provider: anthropic' (the body is then passed through as it is).", param=param,
            )
        if self.needs_native is None:
            self.needs_native = param

    def turn(self, turn: Any, i: int, out: list[dict[str, Any]]) -> None:
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise InvalidRequest(f"Invalid type for '{where}': expected an object with 'role' and 'content'.",
                                 param=where)
        role, content = turn.get("role"), turn.get("content")
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"Invalid value for '{where}.role': expected 'user' or 'assistant', got "
                                 f"{_shown(role)}. The system prompt goes in the top-level 'system'.",
                                 param=f"{where}.role")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            return
        if not isinstance(content, list):
            raise InvalidRequest(f"Invalid type for '{where}.content': expected a string or an array of content "
                                 f"blocks, got {_shown(content)}.", param=f"{where}.content")
        if role == "user":
            self._user(content, where, out)
        else:
            self._assistant(content, where, out)

    def _user(self, blocks: list[Any], where: str, out: list[dict[str, Any]]) -> None:
        parts: list[Block] = []
        for j, block in enumerate(blocks):
            at = f"{where}.content[{j}]"
            kind = _kind(block, at)
            if kind == "text":
                parts.append({"type": "text", "text": _text(block, at)})
            elif kind == "image":
                parts.append(self._image(block, at))
            elif kind == "tool_result":
                # Chat has tool messages, which come straight after the assistant's call: before the
                # turn's other content (where Anthropic wants tool results too).
                out.append(self._tool_result(block, at))
            elif kind in ("thinking", "redacted_thinking"):
                raise InvalidRequest(f"'{at}' is a {kind} block in a user turn; only assistant turns hold them.",
                                     param=at)
            else:
                self.anthropic_only(at, f"is a '{kind}' content block, which only Anthropic deployments take")
                parts.append(block)  # kept as an opaque part: the body passed through carries it
        if parts:
            only_text = len(parts) == 1 and parts[0]["type"] == "text"
            out.append({"role": "user", "content": parts[0]["text"] if only_text else parts})

    def _assistant(self, blocks: list[Any], where: str, out: list[dict[str, Any]]) -> None:
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(blocks):
            at = f"{where}.content[{j}]"
            kind = _kind(block, at)
            if kind == "text":
                texts.append(_text(block, at))
            elif kind == "tool_use":
                name, call_id, arguments = block.get("name"), block.get("id"), block.get("input", {})
                if not isinstance(name, str) or not isinstance(call_id, str):
                    raise InvalidRequest(f"Invalid value for '{at}': a tool_use block needs a string 'id' and "
                                         "'name'.", param=at)
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": name, "arguments": orjson.dumps(arguments).decode()}})
            elif kind in ("thinking", "redacted_thinking"):
                # The model's own reasoning from an earlier turn: only Anthropic reads it back (and only with
                # `thinking` on, which is passed through); other models answer without it.
                continue
            else:
                self.anthropic_only(at, f"is a '{kind}' content block, which only Anthropic deployments take")
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
        if calls:
            message["tool_calls"] = calls
        out.append(message)

    def _image(self, block: Block, at: str) -> Block:
        source = block.get("source")
        kind = source.get("type") if isinstance(source, dict) else None
        if kind == "base64":
            assert isinstance(source, dict)
            media, data = source.get("media_type"), source.get("data")
            if not isinstance(media, str) or not isinstance(data, str):
                raise InvalidRequest(f"Invalid value for '{at}.source': a base64 image needs string 'media_type' "
                                     "and 'data'.", param=f"{at}.source")
            return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
        if kind == "url":
            assert isinstance(source, dict)
            if not isinstance(url := source.get("url"), str):
                raise InvalidRequest(f"Invalid value for '{at}.source.url': expected a string.",
                                     param=f"{at}.source.url")
            return {"type": "image_url", "image_url": {"url": url}}
        self.anthropic_only(f"{at}.source", f"is an image source of type {_shown(kind)}; only 'base64' and "
                            "'url' images are translated")
        return block

    def _tool_result(self, block: Block, at: str) -> dict[str, Any]:
        call_id = block.get("tool_use_id")
        if not isinstance(call_id, str):
            raise InvalidRequest(f"Missing required parameter '{at}.tool_use_id': the id of the tool_use this "
                                 "result answers.", param=f"{at}.tool_use_id")
        content = block.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for k, part in enumerate(content):
                inner = f"{at}.content[{k}]"
                if _kind(part, inner) == "text":
                    texts.append(_text(part, inner))
                else:
                    self.anthropic_only(inner, "is a tool result block other than text; chat tool results are text")
            text = "\n".join(texts)
        else:
            raise InvalidRequest(f"Invalid type for '{at}.content': expected a string or an array of blocks.",
                                 param=f"{at}.content")
        if block.get("is_error") is True:
            # Chat tool messages have no error flag: the model reads it in the text.
            text = f"Error: {text}" if text else "Error"
        return {"role": "tool", "tool_call_id": call_id, "content": text}

    def tools(self, tools: Any) -> list[dict[str, Any]]:
        if not isinstance(tools, list):
            raise InvalidRequest("Invalid type for 'tools': expected an array of tool definitions.", param="tools")
        chat: list[dict[str, Any]] = []
        for i, tool in enumerate(tools):
            at = f"tools[{i}]"
            if not isinstance(tool, dict):
                raise InvalidRequest(f"Invalid type for '{at}': expected an object.", param=at)
            kind = tool.get("type")
            if kind not in (None, "custom"):
                # web_search_*, bash_*, text_editor_*, code_execution_*, computer_*: run by Anthropic.
                self.anthropic_only(f"{at}.type", f"is {_shown(kind)}, a tool Anthropic runs itself")
                continue
            name, schema = tool.get("name"), tool.get("input_schema")
            if not isinstance(name, str) or not name:
                raise InvalidRequest(f"Missing required parameter '{at}.name'.", param=f"{at}.name")
            if not isinstance(schema, dict):
                raise InvalidRequest(f"Missing required parameter '{at}.input_schema': the JSON schema of the "
                                     "tool's input, as an object.", param=f"{at}.input_schema")
            function: dict[str, Any] = {"name": name, "parameters": schema}
            if isinstance(description := tool.get("description"), str):
                function["description"] = description
            chat.append({"type": "function", "function": function})
        return chat


def _tool_choice(choice: Any, params: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        params["tool_choice"] = "auto"
    elif kind == "any":
        params["tool_choice"] = "required"
    elif kind == "none":
        params["tool_choice"] = "none"
        return  # takes no parallelism flag
    elif kind == "tool":
        assert isinstance(choice, dict)
        if not isinstance(name := choice.get("name"), str):
            raise InvalidRequest("Missing required parameter 'tool_choice.name': the tool to call.",
                                 param="tool_choice.name")
        params["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise InvalidRequest(f"Invalid value for 'tool_choice.type': expected 'auto', 'any', 'tool' or 'none', "
                             f"got {_shown(kind)}.", param="tool_choice.type")
    if choice.get("disable_parallel_tool_use") is True:
        params["parallel_tool_calls"] = False


def _system(system: Any) -> str | list[Block]:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise InvalidRequest(f"Invalid type for 'system': expected a string or an array of text blocks, got "
                             f"{_shown(system)}.", param="system")
    # cache_control markers are Anthropic's: they travel in the body passed through, not in the translation.
    parts: list[Block] = []
    for i, block in enumerate(system):
        at = f"system[{i}]"
        if _kind(block, at) != "text":
            raise InvalidRequest(f"Invalid value for '{at}.type': the system prompt takes text blocks only.",
                                 param=f"{at}.type")
        parts.append({"type": "text", "text": _text(block, at)})
    return parts


def _kind(block: Any, at: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise InvalidRequest(f"Invalid value for '{at}': expected a content block, an object with a 'type'.",
                             param=at)
    return kind


def _text(block: Block, at: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(f"Invalid type for '{at}.text': expected a string, got {_shown(text)}.",
                             param=f"{at}.text")
    return text


def _shown(value: Any) -> str:
    text = orjson.dumps(value).decode() if value is not None else "null"
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------- answer: chat → Anthropic


def message_id(completion_id: str | None) -> str:
    """An Anthropic-style id for an answer: the upstream's own `msg_...` when it was Anthropic's."""
    rest = (completion_id or "").removeprefix("chatcmpl-")
    return rest if rest.startswith("msg_") else "msg_" + rest


def stop_reason(finish_reason: str | None) -> str:
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


def usage_of(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Anthropic's usage from OpenAI's: Anthropic's input_tokens leave out the tokens read from its
    prompt cache, which OpenAI's prompt_tokens count (and tell apart as cached_tokens)."""
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": max(0, (usage.get("prompt_tokens") or 0) - cached),
        "output_tokens": usage.get("completion_tokens") or 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def tool_input(arguments: str | None) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's `input` is ({} when they are not one: an
    answer cut short by max_tokens, which stop_reason says)."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def message_of(completion: dict[str, Any], model: str) -> dict[str, Any]:
    """Anthropic's `message` for a chat.completion (`model`: the one the client named, if the answer
    does not say)."""
    choice = (completion.get("choices") or [{}])[0]
    reply = choice.get("message") or {}
    content: list[Block] = []
    text = reply.get("content") or reply.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    for call in reply.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                        "input": tool_input(function.get("arguments"))})
    return {
        "id": message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": completion.get("model") or model,
        "stop_reason": stop_reason(choice.get("finish_reason")),
        "stop_sequence": None,
        "usage": usage_of(completion.get("usage")),
    }


# ---------------------------------------------------------------------------- errors


def error_type(exc: KeelError) -> str:
    return ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")


def error_body(exc: KeelError) -> dict[str, Any]:
    """Anthropic's error body: `{"type": "error", "error": {"type": ..., "message": ...}}`."""
    return {"type": "error", "error": {"type": error_type(exc), "message": exc.message}}

