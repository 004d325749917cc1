"""Anthropic's Messages API behind the OpenAI chat interface, over one pool of keep-alive
connections per deployment (`http_client`).

Requests are translated to `POST /v1/messages` (system prompt at the top level, strict
user/assistant alternation, tool calls and results as content blocks, a required
`max_tokens`); answers and stream events are translated back into chat.completion objects
and chunks, so nothing past this module knows the upstream was not OpenAI-shaped.

JSON answers (`response_format` json_schema or json_object) travel the Anthropic way: as a forced
tool whose `input_schema` is the caller's schema (`AnswerTool`), so the answer is constrained like a
tool call's arguments; its `tool_use` input comes back as the message's `content` (a JSON string, not
a tool call), plain and streamed (`input_json_delta` events become content deltas).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from keel.config import AnthropicDeployment
from keel.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    KeelError,
    NotSupported,
    UpstreamConnectionError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamServerError,
)
from keel.pipeline import Call, ChunkStream, Completion, NativeRequest, Reply, fingerprint_of
from keel.providers.base import ChatOnly, chunk_body, completion_body, usage_body
from keel.providers.http import Upstream, mid_stream_error, read_json
from keel.providers.http_client import Response
from keel.providers.openai_compat import retry_after, upstream_error
from keel.providers.sse import read_events
from keel.types import (
    AssistantMessage,
    ChatRequest,
    DeveloperMessage,
    ImagePart,
    Message,
    NamedToolChoice,
    RefusalPart,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    SystemMessage,
    TextPart,
    Tool,
    ToolChoice,
    ToolMessage,
    UserMessage,
    content_text,
)

Block = dict[str, Any]

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic says "prompt is too long: N tokens > M maximum" or, when the prompt fits but
# prompt plus max_tokens does not, "input length and `max_tokens` exceed context limit".
_TOO_LONG = ("prompt is too long", "exceed context limit", "context window")


class AnthropicProvider(ChatOnly):
    def __init__(self, config: AnthropicDeployment, name: str) -> None:
        self.config = config
        self.name = name
        headers = {"content-type": "application/json", "anthropic-version": config.anthropic_version}
        if config.api_key_env and (key := os.environ.get(config.api_key_env)):
            headers["x-api-key"] = key
        self.upstream = Upstream(config, config.base_url, headers, name, anthropic_error)

    async def start(self) -> None:
        """Nothing to open: connections are made as calls need them."""

    async def close(self) -> None:
        await self.upstream.close()

    async def chat(self, request: ChatRequest, call: Call) -> Reply:
        native = passthrough(request, call.ctx.native, self.config)
        answer = answer_tool(request) if native is None else None
        response = await self._post(orjson.dumps(native or messages_body(request, self.config, answer)))
        if not request.stream:
            return Completion(completion_from(await self._json(response), self.name, answer))
        return ChunkStream(self._chunks(response, answer))

    async def _post(self, body: bytes) -> Response:
        return await self.upstream.post("/v1/messages", body)

    async def _json(self, response: Response) -> dict[str, Any]:
        body = await read_json(response, self.name)
        if not isinstance(body, dict) or body.get("type") != "message" or not isinstance(body.get("content"), list):
            raise UpstreamMalformed(
                f"deployment '{self.name}' answered with JSON that is not a message", deployment=self.name
            )
        return body

    async def _chunks(self, response: Response, answer: AnswerTool | None) -> AsyncIterator[dict[str, Any]]:
        translate = StreamTranslator(self.name, answer)
        try:
            async for event in read_events(response.parts(mid_stream_error(self.name))):
                for chunk in translate(self._event(event.data)):
                    yield chunk
                if translate.stopped:
                    break
        finally:
            response.release() if translate.stopped else response.close()
        if not translate.stopped:
            raise UpstreamConnectionError(
                f"deployment '{self.name}' ended the stream before it finished (no message_stop)",
                deployment=self.name,
            )

    def _event(self, data: bytes) -> dict[str, Any]:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            raise UpstreamMalformed(
                f"deployment '{self.name}' sent a stream event that is not a JSON object", deployment=self.name
            )
        if event.get("type") == "error" and isinstance(error := event.get("error"), dict) and "message" in error:
            error["message"] = self.upstream.scrubbed(str(error["message"]))  # an echoed key stays here
        return event


# ---------------------------------------------------------------------------- request: OpenAI → Anthropic


def messages_body(
    request: ChatRequest, config: AnthropicDeployment, answer: AnswerTool | None = None
) -> dict[str, Any]:
    """The `POST /v1/messages` body for an OpenAI chat request (`answer`: its JSON answer tool, if any)."""
    body: dict[str, Any] = {
        "model": config.model,
        "max_tokens": request.output_limit or config.default_max_tokens,  # Anthropic requires it
        "messages": _turns(request),
    }
    if system := _system(request):
        body["system"] = system
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop_sequences"] = [request.stop] if isinstance(request.stop, str) else request.stop
    if request.user:
        body["metadata"] = {"user_id": request.user}
    tools = [_tool(tool) for tool in request.tools or ()]
    if answer is not None:
        body["tools"] = [*tools, answer.spec]
        body["tool_choice"] = answer.choice(request, has_tools=bool(tools))
    elif tools:
        body["tools"] = tools
        body["tool_choice"] = _tool_choice(request.tool_choice, request.parallel_tool_calls)
    if request.stream:
        body["stream"] = True
    # seed, penalties, logprobs and n have no Anthropic counterpart; they are dropped.
    return body


def _system(request: ChatRequest) -> str:
    parts = [
        content_text(m.content) for m in request.messages if isinstance(m, SystemMessage | DeveloperMessage)
    ]
    return "\n\n".join(p for p in parts if p)


def passthrough(
    request: ChatRequest, native: NativeRequest | None, config: AnthropicDeployment
) -> dict[str, Any] | None:
    """The client's own Messages body (from /v1/messages), with this deployment's model, when the stages
    left the request as the edge translated it; None when there is none, or a stage changed the request
    (a PII redaction, a validation re-ask): then the translation of what the stages made is sent, so what
    they did holds."""
    if native is None or native.dialect != "messages":
        return None
    if fingerprint_of(request) != native.fingerprint:
        if native.needs_native is not None:
            raise NotSupported(
                f"A stage changed this request on its way (a guardrail redaction, a validation re-ask), so it is "
                f"sent translated, not as the client's own body, and '{native.needs_native}' has no translation. "
                "Remove that field, or turn off what changes the request for this model.",
                param=native.needs_native,
            )
        return None
    return {**native.body, "model": config.model}


# ---------------------------------------------------------------------------- JSON answers as a forced tool

ANSWER_TOOL = "json_answer"  # the answer tool's name for json_object, or when the schema's name cannot be used
WRAPPED = "value"  # the one property a schema that is not an object schema is wrapped in
_TOOL_NAME = re.compile(r"[^a-zA-Z0-9_-]")
_ANSWER_DESCRIPTION = (
    "Give your final answer by calling this tool: its input is the answer itself, "
    "as JSON matching the input schema exactly."
)


@dataclass(frozen=True, slots=True)
class AnswerTool:
    """The tool a JSON answer is forced through: the Messages API has no JSON mode, but a tool's
    `input_schema` constrains the model's output, and `tool_choice` can make it call that tool.

    Anthropic takes only object schemas as `input_schema`: another schema (an array, a string, a
    `oneOf` without `type`) is `wrapped` as the one required property `value` of an object, and
    unwrapped on the way back.
    """

    name: str
    schema: Any  # the schema the answer matches, as the caller gave it
    wrapped: bool

    @property
    def spec(self) -> Block:
        return {"name": self.name, "description": _ANSWER_DESCRIPTION, "input_schema": self._input_schema()}

    def _input_schema(self) -> Any:
        if not self.wrapped:
            return self.schema
        inner = dict(self.schema) if isinstance(self.schema, Mapping) else self.schema
        outer: Block = {"type": "object", "properties": {WRAPPED: inner}, "required": [WRAPPED],
                        "additionalProperties": False}
        if isinstance(inner, dict):
            # `#/$defs/...` references are from the root: the definitions move up with it.
            for key in ("$defs", "definitions"):
                if key in inner:
                    outer[key] = inner.pop(key)
        return outer

    def choice(self, request: ChatRequest, *, has_tools: bool) -> Block:
        """Without caller tools, or with tool_choice 'none': the answer tool, forced. With caller tools
        under 'auto': any tool, theirs or the answer (a tool call either way, never free text)."""
        if has_tools and request.tool_choice in (None, "auto"):
            mapped: Block = {"type": "any"}
            if request.parallel_tool_calls is False:
                mapped["disable_parallel_tool_use"] = True
            return mapped
        return {"type": "tool", "name": self.name, "disable_parallel_tool_use": True}

    def content(self, tool_input: Any) -> str:
        """The answer as the message's content: the tool's input as a JSON string."""
        value = tool_input.get(WRAPPED) if self.wrapped and isinstance(tool_input, dict) else tool_input
        return orjson.dumps(value).decode()


def answer_tool(request: ChatRequest) -> AnswerTool | None:
    """The answer tool for a JSON request; None when there is no JSON answer to force, or when the
    caller's tool_choice requires a call of one of their own tools (that call is the answer)."""
    fmt = request.response_format
    if not isinstance(fmt, ResponseFormatJSONSchema | ResponseFormatJSONObject):
        return None
    if request.tools and (request.tool_choice == "required" or isinstance(request.tool_choice, NamedToolChoice)):
        return None
    schema: Any = {"type": "object"}
    name = ANSWER_TOOL
    if isinstance(fmt, ResponseFormatJSONSchema) and fmt.json_schema.schema_ is not None:
        schema = fmt.json_schema.schema_
        name = _TOOL_NAME.sub("_", fmt.json_schema.name)[:64] or ANSWER_TOOL
    taken = {tool.function.name for tool in request.tools or ()}
    while name in taken:
        name = (name + "_answer")[-64:]
    wrapped = not (isinstance(schema, Mapping) and schema.get("type") == "object")
    return AnswerTool(name=name, schema=schema, wrapped=wrapped)


def _turns(request: ChatRequest) -> list[dict[str, Any]]:
    """User and assistant turns, strictly alternating: Anthropic refuses two in a row of one role,
    so consecutive same-role messages (tool results included, which travel as user turns) merge."""
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        if isinstance(message, SystemMessage | DeveloperMessage):
            continue
        role, blocks = _turn(message, i)
        if not blocks:
            continue  # an empty turn is refused upstream and says nothing
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        if turn["role"] == "user":
            # Anthropic wants a turn's tool results before anything else in it (stable order kept).
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")
        turn["content"] = _compact(turn["content"])
    return turns


def _turn(message: Message, i: int) -> tuple[str, list[Block]]:
    if isinstance(message, UserMessage):
        return "user", _user_blocks(message.content, i)
    if isinstance(message, AssistantMessage):
        return "assistant", _assistant_blocks(message, i)
    if isinstance(message, ToolMessage):
        return "user", [_tool_result(message)]
    raise NotSupported(
        "legacy 'function' messages cannot be sent to an Anthropic deployment; use tools and tool_calls",
        param=f"messages[{i}]",
    )


def _compact(blocks: list[Block]) -> str | list[Block]:
    """A lone plain text block as the string form Anthropic also accepts."""
    if len(blocks) == 1 and blocks[0].keys() == {"type", "text"} and blocks[0]["type"] == "text":
        return str(blocks[0]["text"])
    return blocks


def _user_blocks(content: str | list[Any], i: int) -> list[Block]:
    if isinstance(content, str):
        return _text_blocks([content])
    blocks: list[Block] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            blocks.extend(_with_cache_control(_text_blocks([part.text]), part))
        elif isinstance(part, ImagePart):
            image = _image(part.image_url.url, f"messages[{i}].content[{j}]")
            blocks.extend(_with_cache_control([image], part))
        else:
            raise NotSupported(
                f"content parts of type '{part.type}' cannot be sent to an Anthropic deployment",
                param=f"messages[{i}].content[{j}]",
            )
    return blocks


def _text_blocks(texts: Iterable[str]) -> list[Block]:
    # Anthropic refuses empty text blocks.
    return [{"type": "text", "text": text} for text in texts if text]


def _with_cache_control(blocks: list[Block], part: Any) -> list[Block]:
    """Keep a client's prompt-caching marker (an extra field on the part) on the block."""
    marker = (part.model_extra or {}).get("cache_control")
    if marker is not None:
        for block in blocks:
            block["cache_control"] = marker
    return blocks


def _image(url: str, param: str) -> Block:
    if not url.startswith("data:"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    header, _, data = url.partition(",")
    media_type, _, encoding = header.removeprefix("data:").partition(";")
    if encoding != "base64" or not data:
        raise InvalidRequest("image data URLs must be base64: data:<media type>;base64,<data>", param=param)
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _assistant_blocks(message: AssistantMessage, i: int) -> list[Block]:
    content = message.content
    if isinstance(content, str) or content is None:
        texts = [content or ""]
    else:
        texts = [part.text if isinstance(part, TextPart) else part.refusal for part in content
                 if isinstance(part, TextPart | RefusalPart)]
    blocks = _text_blocks(texts)
    for j, tool_call in enumerate(message.tool_calls or ()):
        blocks.append({
            "type": "tool_use",
            "id": tool_call.id,
            "name": tool_call.function.name,
            "input": _arguments(tool_call.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments"),
        })
    return blocks


def _arguments(arguments: str, param: str) -> dict[str, Any]:
    if not arguments.strip():
        return {}  # some clients send "" for a call without arguments
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequest("tool call arguments must be a JSON object to send to Anthropic", param=param)
    return parsed


def _tool_result(message: ToolMessage) -> Block:
    block: Block = {"type": "tool_result", "tool_use_id": message.tool_call_id}
    if text := content_text(message.content):
        block["content"] = text
    return block


def _tool(tool: Tool) -> Block:
    spec: Block = {"name": tool.function.name}
    if tool.function.description:
        spec["description"] = tool.function.description
    spec["input_schema"] = tool.function.parameters or {"type": "object", "properties": {}}
    return spec


def _tool_choice(choice: ToolChoice | None, parallel: bool | None) -> Block:
    if isinstance(choice, NamedToolChoice):
        mapped: Block = {"type": "tool", "name": choice.function.name}
    elif choice == "none":
        return {"type": "none"}  # takes no parallelism flag
    else:
        mapped = {"type": "any" if choice == "required" else "auto"}
    if parallel is False:
        mapped["disable_parallel_tool_use"] = True
    return mapped


# ---------------------------------------------------------------------------- answer: Anthropic → OpenAI


def completion_from(message: dict[str, Any], deployment: str, answer: AnswerTool | None = None) -> dict[str, Any]:
    """The chat.completion object for an Anthropic message; a call of the `answer` tool is the content
    (text is dropped then: with the tool forced, the answer is the tool's input alone)."""
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in message["content"]:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and answer is None:
            texts.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use" and answer is not None and block.get("name") == answer.name:
            texts = [answer.content(block.get("input"))]
        elif block.get("type") == "tool_use":
            tool_calls.append(_tool_call(block))
    text = "".join(texts)
    reply: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    finish = finish_reason(message.get("stop_reason"))
    return completion_body(
        id="chatcmpl-" + str(message.get("id") or ""),
        model=str(message.get("model") or ""),
        created=int(time.time()),
        message=reply,
        finish_reason="stop" if finish == "tool_calls" and not tool_calls else finish,
        usage=usage_from(message.get("usage") or {}),
    )


def _tool_call(block: Block) -> dict[str, Any]:
    return {
        "id": block.get("id"),
        "type": "function",
        "function": {"name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()},
    }


def finish_reason(stop_reason: str | None) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(stop_reason, "stop")


def usage_from(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI usage: Anthropic's input_tokens leaves out cache writes and reads; OpenAI's
    prompt_tokens counts every prompt token, with the cached ones also told apart."""
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0) + cached
    body = usage_body(prompt, usage.get("output_tokens") or 0)
    body["prompt_tokens_details"] = {"cached_tokens": cached}
    return body


class StreamTranslator:
    """Anthropic stream events in, OpenAI chunks out; remembers what later events need
    (the message id and model, prompt usage from message_start, which block is which tool).

    With an `answer` tool, its input's fragments are content deltas as they come (held to the
    block's end only when the schema was wrapped, to take the wrapper off) and text is dropped,
    as in `completion_from`."""

    def __init__(self, deployment: str, answer: AnswerTool | None = None) -> None:
        self.deployment = deployment
        self.answer = answer
        self.answer_block: int | None = None  # the Anthropic block index of the answer tool's call
        self.held: list[str] = []  # a wrapped answer's fragments, until its block ends
        self.id = ""
        self.model = ""
        self.created = int(time.time())
        self.usage: dict[str, Any] = {}
        self.tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self.stopped = False
        self._handlers: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
            "message_start": self._message_start,
            "content_block_start": self._block_start,
            "content_block_delta": self._block_delta,
            "content_block_stop": self._block_stop,
            "message_delta": self._message_delta,
            "message_stop": self._message_stop,
            "error": self._error,
        }

    def __call__(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        # ping and event types newer than this code carry nothing to pass on.
        handler = self._handlers.get(str(event.get("type")))
        return handler(event) if handler else []

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return chunk_body(id=self.id, model=self.model, created=self.created, delta=delta, finish_reason=finish)

    def _message_start(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        message = event.get("message") or {}
        self.id = "chatcmpl-" + str(message.get("id") or "")
        self.model = str(message.get("model") or "")
        self._add_usage(message.get("usage"))
        return [self._chunk({"role": "assistant", "content": "", "refusal": None})]

    def _block_start(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        block = event.get("content_block") or {}
        if block.get("type") == "text" and block.get("text") and self.answer is None:
            return [self._chunk({"content": block["text"]})]
        if block.get("type") != "tool_use":
            return []  # thinking blocks have no OpenAI counterpart
        if self.answer is not None and block.get("name") == self.answer.name:
            self.answer_block = int(event.get("index", 0))
            return []
        index = self.tools[int(event.get("index", 0))] = len(self.tools)
        call = {"index": index, "id": block.get("id"), "type": "function",
                "function": {"name": block.get("name"), "arguments": ""}}
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        delta = event.get("delta") or {}
        if delta.get("type") == "text_delta" and delta.get("text") and self.answer is None:
            return [self._chunk({"content": delta["text"]})]
        if self.answer_block is not None and int(event.get("index", 0)) == self.answer_block:
            return self._answer_delta(str(delta.get("partial_json") or ""))
        index = self.tools.get(int(event.get("index", 0)))
        if delta.get("type") == "input_json_delta" and delta.get("partial_json") and index is not None:
            return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]})]
        return []

    def _answer_delta(self, fragment: str) -> list[dict[str, Any]]:
        assert self.answer is not None
        if not fragment:
            return []
        if self.answer.wrapped:
            self.held.append(fragment)
            return []
        return [self._chunk({"content": fragment})]

    def _block_stop(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if self.answer is None or not self.answer.wrapped or int(event.get("index", 0)) != self.answer_block:
            return []
        text = "".join(self.held)
        self.held = []
        try:
            text = self.answer.content(orjson.loads(text))
        except orjson.JSONDecodeError:
            pass  # cut short (max_tokens): passed on as it is, and finish_reason 'length' says why
        return [self._chunk({"content": text})] if text else []

    def _message_delta(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        self._add_usage(event.get("usage"))
        stop_reason = (event.get("delta") or {}).get("stop_reason")
        finish = finish_reason(stop_reason) or "stop"
        if finish == "tool_calls" and not self.tools:
            finish = "stop"  # the only tool called was the answer tool: the answer is the content
        return [self._chunk({}, finish)]

    def _message_stop(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        self.stopped = True
        # Always sent: cost needs it; ChunkStream.hide_usage keeps it from clients that did not ask.
        usage = usage_from(self.usage)
        return [chunk_body(id=self.id, model=self.model, created=self.created, delta={}, usage=usage)]

    def _error(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        raise stream_error(event.get("error") or {}, self.deployment)

    def _add_usage(self, usage: Any) -> None:
        # message_delta counts are cumulative; a null there means "unchanged", not zero.
        if isinstance(usage, dict):
            self.usage.update({key: value for key, value in usage.items() if value is not None})


# ---------------------------------------------------------------------------- errors


def anthropic_error(status: int, text: str, headers: Any, deployment: str) -> KeelError:
    """The precise error for an HTTP error answer in Anthropic's shape
    (`{"type": "error", "error": {"type": "overloaded_error", "message": ...}}`)."""
    kind, message = _error_detail(text)
    where = f"deployment '{deployment}' answered {status}"
    if status == 529 or kind == "overloaded_error":
        # Overloaded is Anthropic's capacity, not the request: back off and retry, like a 429.
        return UpstreamRateLimited(f"{where}: {message}", retry_after=retry_after(headers), deployment=deployment)
    if status == 400 and any(phrase in message.lower() for phrase in _TOO_LONG):
        return ContextLengthExceeded(f"{where}: {message}", deployment=deployment)
    return upstream_error(status, text, headers, deployment)


def stream_error(error: dict[str, Any], deployment: str) -> KeelError:
    """An `error` event inside a stream that had begun."""
    kind = str(error.get("type") or "api_error")
    message = f"deployment '{deployment}' failed mid-stream: {kind}: {error.get('message') or 'no message'}"
    if kind in ("overloaded_error", "rate_limit_error"):
        return UpstreamRateLimited(message, deployment=deployment)
    return UpstreamServerError(message, deployment=deployment)


def _error_detail(text: str) -> tuple[str | None, str]:
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, text[:500] or "no message"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, text[:500] or "no message"
    return error.get("type"), str(error.get("message") or text[:500])
