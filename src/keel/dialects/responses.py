"""The OpenAI Responses API (`POST /v1/responses`) translated at the edge: a request body to the one
internal call's chat body (`chat_body`), and a chat.completion back to a Response object (`response_of`).

Pure functions over plain dicts: the route parses the JSON once, these move values between two
dicts, and `keel.request_errors.parse_request` validates the chat body once. A field the one call
cannot carry is refused with a 400 naming it (never dropped in silence); see docs/responses-api.md.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from keel.errors import InvalidRequest
from keel.ids import random_hex
from keel.request_errors import json_kind

# Fields taken as they are (their values are checked when the chat body is validated).
_SAME = ("model", "temperature", "top_p", "user", "metadata", "parallel_tool_calls")
# Fields read below, or accepted with no effect on the answer (OpenAI's prompt-cache routing hints).
_READ = frozenset({
    *_SAME, "input", "instructions", "tools", "tool_choice", "text", "max_output_tokens", "stream", "store",
    "previous_response_id", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "stream_options",
})
# Fields the one call cannot carry: why, and what to do instead. Refused unless absent, null or the
# default named (the SDKs send nothing they were not given, so a default here was asked for explicitly).
_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "background": ((False,), "Keel answers while the connection is open; leave 'background' out and "
                             "send 'stream': true for a long answer."),
    "reasoning": ((), "reasoning settings are not passed on by Keel's gateway; leave 'reasoning' out."),
    "include": ((), "no extra output items (reasoning, logprobs, tool results) are served by Keel; leave "
                    "'include' out."),
    "conversation": ((), "Keel keeps conversations as stored responses; continue one with "
                         "'previous_response_id' instead."),
    "prompt": ((), "OpenAI's stored prompts are not served by Keel; send the text in 'input' and "
                   "'instructions', or name a Keel prompt template in metadata.prompt (docs/prompts.md)."),
    "truncation": (("disabled",), "Keel never drops input to fit a context window; leave 'truncation' out "
                                  "(or send 'disabled') and shorten the input."),
    "max_tool_calls": ((), "it limits built-in tools, which Keel does not serve; leave 'max_tool_calls' out."),
    "top_logprobs": ((), "log probabilities are not served on /v1/responses; leave 'top_logprobs' out, or "
                         "use /v1/chat/completions with 'logprobs'."),
    "service_tier": (("auto", "default"), "Keel chooses deployments itself (keel.yaml routing); leave "
                                          "'service_tier' out."),
    "context_management": ((), "Keel does not compact conversations; leave 'context_management' out."),
    "moderation": ((), "use Keel's guardrails (keel.yaml guardrails) instead; leave 'moderation' out."),
    "prompt_cache_options": ((), "leave 'prompt_cache_options' out; Keel's caches are set in keel.yaml."),
}
_BUILT_IN_TOOLS = "web_search, file_search, computer use, code interpreter, MCP, image generation, shell"
_MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
_TEXT_PARTS = {"input_text": "text", "output_text": "text"}


@dataclass(slots=True)
class Translated:
    """A Responses request as the chat body the pipeline takes, and what the answer echoes."""

    chat: dict[str, Any]
    conversation: list[dict[str, Any]]  # the chat messages without the instructions: what a stored response keeps
    origins: list[str]  # for each chat message, the Responses parameter it came from (for error messages)
    echo: dict[str, Any] = field(default_factory=dict)  # the request's settings, as a Response repeats them
    store: bool = True
    previous_response_id: str | None = None


def refuse(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid value for '{param}': {message}", param=param)


def previous_id(body: Any) -> str | None:
    """The body's `previous_response_id`, checked: the route loads that response before translating."""
    if not isinstance(body, dict):
        return None
    value = body.get("previous_response_id")
    if value is not None and (not isinstance(value, str) or not value):
        raise refuse("previous_response_id",
                     f"expected the id of a stored response (a string), got {json_kind(value)}.")
    return value


def chat_body(body: dict[str, Any], previous: list[dict[str, Any]] | None = None) -> Translated:
    """The chat body a Responses request asks for; `previous`: the chat messages of the response it
    continues (`previous_response_id`), which go before its input (its instructions do not: OpenAI
    does not carry them over)."""
    for name, value in body.items():
        if name in _READ:
            continue
        refused = _REFUSED.get(name)
        if refused is None:
            raise InvalidRequest(
                f"Unknown parameter: '{name}'. /v1/responses accepts the parameters listed in "
                "docs/responses-api.md; leave this one out.", param=name)
        allowed, why = refused
        if value is not None and value not in allowed and value != [] and value != {}:
            raise InvalidRequest(f"'{name}' is not supported by Keel: {why}", param=name)
    chat: dict[str, Any] = {name: body[name] for name in _SAME if name in body}
    if "user" not in chat and isinstance(body.get("safety_identifier"), str):
        chat["user"] = body["safety_identifier"]  # OpenAI's successor of `user`: the same use here
    conversation = list(previous or ())
    origins = ["previous_response_id"] * len(conversation)
    _input(body.get("input"), conversation, origins)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise refuse("instructions", f"expected a string, got {json_kind(instructions)}.")
    messages = conversation
    if instructions:
        messages = [{"role": "system", "content": instructions}, *conversation]
        origins = ["instructions", *origins]
    chat["messages"] = messages
    tools = _tools(body.get("tools"))
    if tools is not None:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None:
        chat["tool_choice"] = _tool_choice(choice)
    text = body.get("text")
    fmt = _format(text)
    if fmt is not None:
        chat["response_format"] = fmt
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    stream = body.get("stream")
    if stream is not None:
        chat["stream"] = stream
        if stream is True:  # response.completed carries the usage: ask the pipeline for it
            chat["stream_options"] = {"include_usage": True}
    _stream_options(body.get("stream_options"))
    store = body.get("store", True)
    if store is None:
        store = True
    if not isinstance(store, bool):
        raise refuse("store", f"expected a boolean, got {json_kind(store)}.")
    echo = {
        "instructions": instructions,
        "tools": body.get("tools") or [],
        "tool_choice": choice if choice is not None else "auto",
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "metadata": body.get("metadata") or {},
        "text": {"format": (text or {}).get("format") or {"type": "text"}},
        "max_output_tokens": body.get("max_output_tokens"),
        "previous_response_id": body.get("previous_response_id"),
        "truncation": "disabled",
        "store": store,
        "background": False,
    }
    if isinstance(body.get("user"), str):
        echo["user"] = body["user"]
    return Translated(chat, conversation, origins, echo, store, body.get("previous_response_id"))


def _input(value: Any, messages: list[dict[str, Any]], origins: list[str]) -> None:
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        origins.append("input")
        return
    if value is None:
        return  # a continuation may add nothing but instructions; an empty call is refused when validated
    if not isinstance(value, list):
        raise refuse("input", f"expected a string or an array of input items, got {json_kind(value)}.")
    for n, item in enumerate(value):
        where = f"input[{n}]"
        if not isinstance(item, dict):
            raise refuse(where, f"expected an input item (an object), got {json_kind(item)}.")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, where))
            origins.append(where)
        elif kind == "function_call":
            call = {"id": _text(item, "call_id", where), "type": "function",
                    "function": {"name": _text(item, "name", where), "arguments": _text(item, "arguments", where)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and origins[-1] != "previous_response_id":
                last.setdefault("tool_calls", []).append(call)  # consecutive calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origins.append(where)
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _parts(output, f"{where}.output", "tool")
            messages.append({"role": "tool", "tool_call_id": _text(item, "call_id", where), "content": content})
            origins.append(where)
        else:
            raise refuse(f"{where}.type", (
                f"input items of type {json_kind(kind) if not isinstance(kind, str) else repr(kind)} are not "
                "supported by Keel. Send messages, 'function_call' and 'function_call_output' items; for "
                "earlier turns, send them as messages or continue with 'previous_response_id'."))


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in _MESSAGE_ROLES:  # a set: an object or array is no role
        got = repr(role) if isinstance(role, str) else json_kind(role)
        raise refuse(f"{where}.role", f"expected one of 'user', 'system', 'developer', 'assistant', got {got}.")
    content = item.get("content")
    if not isinstance(content, str):
        content = _parts(content, f"{where}.content", role)
    return {"role": role, "content": content}


def _parts(parts: Any, where: str, role: str) -> str:
    """Text parts as one string (chat's text parts join the same way)."""
    if not isinstance(parts, list):
        raise refuse(where, f"expected a string or an array of content parts, got {json_kind(parts)}.")
    texts: list[str] = []
    for n, part in enumerate(parts):
        raw = part.get("type") if isinstance(part, dict) else None
        kind = raw if isinstance(raw, str) else None  # looked up in a dict: an object or array is no type
        if kind in _TEXT_PARTS or (kind == "refusal" and role == "assistant"):
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise refuse(f"{where}[{n}].text", f"expected a string, got {json_kind(text)}.")
            texts.append(text)
        elif kind in ("input_image", "input_file", "input_audio"):
            raise refuse(f"{where}[{n}].type", (
                f"'{kind}' parts are not supported on /v1/responses by Keel; send text parts "
                "('input_text'), or send images to /v1/chat/completions as 'image_url' parts."))
        else:
            got = repr(raw) if isinstance(raw, str) else json_kind(raw)
            raise refuse(f"{where}[{n}].type", f"expected a text part ('input_text' or 'output_text'), got {got}.")
    return "".join(texts)


def _text(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise refuse(f"{where}.{name}", f"expected a string, got {json_kind(value)}.")
    return value


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise refuse("tools", f"expected an array of tools, got {json_kind(tools)}.")
    out = []
    for n, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise refuse(f"tools[{n}].type", (
                f"Keel serves function tools only, got {kind!r}. Built-in tools ({_BUILT_IN_TOOLS}) run "
                "inside OpenAI; define the tool as {'type': 'function', 'name', 'parameters'} and run it in "
                "your code."))
        assert isinstance(tool, dict)
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict")
                    if tool.get(key) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    kind = choice.get("type") if isinstance(choice, dict) else json_kind(choice)
    raise refuse("tool_choice", (
        f"Keel accepts 'none', 'auto', 'required' or {{'type': 'function', 'name': ...}}, got {kind!r}."))


def _format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise refuse("text", f"expected an object, got {json_kind(text)}.")
    if text.get("verbosity") is not None:
        raise InvalidRequest("'text.verbosity' is not supported by Keel; leave it out.", param="text.verbosity")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        spec = {key: fmt[key] for key in ("name", "description", "schema", "strict") if fmt.get(key) is not None}
        return {"type": "json_schema", "json_schema": spec}
    raise refuse("text.format.type", f"expected 'text', 'json_object' or 'json_schema', got {kind!r}.")


def _stream_options(options: Any) -> None:
    # Only include_obfuscation, which pads deltas against side channels: Keel sends no padding.
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_obfuscation"}):
        raise refuse("stream_options", "Keel accepts only 'include_obfuscation' there; leave the rest out.")


# Where the chat body's parameters came from, for a refusal in the client's own terms.
_CHAT_PARAMS = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format"}
_MESSAGE_PARAM = re.compile(r"messages\[(\d+)\]")
_TOOL_PARAM = re.compile(r"tools\[(\d+)\]\.function")


def in_responses_terms(exc: InvalidRequest, origins: list[str]) -> InvalidRequest:
    """A refusal of the chat body, reworded with the Responses parameters the client sent."""

    def renamed(text: str) -> str:
        text = _MESSAGE_PARAM.sub(lambda m: origins[int(m[1])] if int(m[1]) < len(origins) else m[0], text)
        text = _TOOL_PARAM.sub(lambda m: f"tools[{m[1]}]", text)
        for chat_name, name in _CHAT_PARAMS.items():
            text = text.replace(f"'{chat_name}", f"'{name}")
        return text.replace("'messages'", "'input'")

    param = exc.param
    if param is not None:
        param = renamed(f"'{param}'")[1:-1]
    return InvalidRequest(renamed(exc.message), param=param)


# ---------------------------------------------------------------------------- the answer


def new_id(prefix: str) -> str:
    return prefix + random_hex(16)


def usage_of(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": usage.get("prompt_tokens", 0),
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": usage.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.get("total_tokens", 0),
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def shell(response_id: str, model: str, echo: dict[str, Any], created_at: int | None = None) -> dict[str, Any]:
    """A Response in progress, before any output: what `response.created` carries."""
    return {
        "id": response_id, "object": "response", "created_at": created_at or int(time.time()),
        "status": "in_progress", "error": None, "incomplete_details": None, "model": model, "output": [],
        **echo,
    }


def finished(response: dict[str, Any], finish_reason: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    """`response` completed (or incomplete: cut at the output limit, or by a content filter)."""
    incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason or "")
    response["status"] = "incomplete" if incomplete else "completed"
    response["incomplete_details"] = {"reason": incomplete} if incomplete else None
    if not incomplete:
        response["completed_at"] = int(time.time())
    if (counted := usage_of(usage)) is not None:  # not nullable: absent when the upstream sent none
        response["usage"] = counted
    return response


def response_of(completion: dict[str, Any], response_id: str, echo: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion as the Response object a whole (not streamed) answer is."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    content, refusal, calls = message.get("content"), message.get("refusal"), message.get("tool_calls") or ()
    if content or refusal or not calls:
        parts = [text_part(content or "")] if content or not refusal else []
        if refusal:
            parts.append({"type": "refusal", "refusal": refusal})
        output.append(message_item(new_id("msg_"), parts, "completed"))
    for call in calls:
        function = call.get("function") or {}
        output.append(call_item(new_id("fc_"), call.get("id") or new_id("call_"), function.get("name", ""),
                                function.get("arguments", ""), "completed"))
    response = shell(response_id, completion.get("model") or "", echo, completion.get("created"))
    response["output"] = output
    return finished(response, choice.get("finish_reason"), completion.get("usage"))


def answer_message(completion: dict[str, Any]) -> dict[str, Any]:
    """The answer as the chat message a continuation sends back (what a stored response keeps)."""
    message = ((completion.get("choices") or [{}])[0]).get("message") or {}
    kept: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        kept["tool_calls"] = [
            {"id": call.get("id"), "type": "function",
             "function": {"name": call["function"].get("name", ""), "arguments": call["function"].get("arguments", "")}}
            for call in message["tool_calls"]
        ]
    return kept
