"""OpenAI wire types, as clients send them and as strict clients expect them back.

Requests are validated (bad input is the client's mistake and gets a 400), but fields this
version does not know are kept and passed on: newer clients must not break on an older Keel.
Responses are built as plain dicts on the hot path (one orjson serialisation each); the
pydantic models here describe them and give library users typed objects.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, field_validator


class _Open(BaseModel):
    """A wire object that keeps fields it does not know."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ---------------------------------------------------------------------------- request parts


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str
    detail: str | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


class RefusalPart(_Open):
    type: Literal["refusal"]
    refusal: str


class OtherPart(_Open):
    """input_audio, file and whatever a newer API adds: passed on untouched."""

    type: str


KNOWN_PARTS = ("text", "image_url", "refusal")


def _part_kind(part: Any) -> str:
    # A known type is held to its schema (a text part without text is refused here, not
    # upstream); any other type is passed on as it came.
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return kind if kind in KNOWN_PARTS else "other"


ContentPart = Annotated[
    Annotated[TextPart, Tag("text")]
    | Annotated[ImagePart, Tag("image_url")]
    | Annotated[RefusalPart, Tag("refusal")]
    | Annotated[OtherPart, Tag("other")],
    Discriminator(_part_kind),
]


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Open):
    role: Literal["system"]
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(_Open):
    role: Literal["developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Open):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | list[TextPart | RefusalPart] | None = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None


class ToolMessage(_Open):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


class FunctionMessage(_Open):
    role: Literal["function"]
    content: str | None
    name: str


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


class FunctionDefinition(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoiceFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JSONSchemaSpec(_Open):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatText(_Open):
    type: Literal["text"]


class ResponseFormatJSONObject(_Open):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(_Open):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
    Field(discriminator="type"),
]


# OpenAI's `metadata`: at most 16 pairs, keys of at most 64 characters, values of at most 512.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
Metadata = Annotated[
    dict[Annotated[str, StringConstraints(max_length=METADATA_KEY_CHARS)],
         Annotated[str, StringConstraints(max_length=METADATA_VALUE_CHARS)]],
    Field(max_length=METADATA_PAIRS),
]


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def no_control_characters(value: str | None) -> str | None:
    """Refuse a name with a control character (NUL, CR, LF, ...): it would reach log lines,
    headers and databases (PostgreSQL refuses NUL in text) and never names anything real."""
    if value is not None and (found := _CONTROL.search(value)):
        raise ValueError(
            f"it must not contain control characters; character {found.start()} is "
            f"{ascii(found.group())[1:-1]}. Send a plain name"
        )
    return value


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatRequest(_Open):
    """POST /v1/chat/completions."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    metadata: Metadata | None = None

    _plain_names = field_validator("model", "user")(no_control_characters)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError(
                "Keel returns one choice per request; leave 'n' out or send 1, "
                "and send several requests for several answers"
            )
        return n

    @property
    def output_limit(self) -> int | None:
        """The client's cap on generated tokens, whichever field it used."""
        return self.max_completion_tokens or self.max_tokens

    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if isinstance(message, UserMessage):
                return content_text(message.content)
        return ""


def content_text(content: str | list[Any] | None) -> str:
    """The text of a message's content, string or parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, TextPart))


# OpenAI's limits: no empty input, at most 2048 inputs in one request.
_Inputs = Field(min_length=1, max_length=2048)
EmbeddingInput = (
    Annotated[str, Field(min_length=1)]
    | Annotated[list[str], _Inputs]
    | Annotated[list[int], _Inputs]
    | Annotated[list[Annotated[list[int], Field(min_length=1)]], _Inputs]
)


class EmbeddingRequest(_Open):
    """POST /v1/embeddings: a string, strings, token ids, or lists of token ids."""

    model: str = Field(min_length=1, max_length=256)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    _plain_names = field_validator("model", "user")(no_control_characters)


# ---------------------------------------------------------------------------- responses


class CompletionTokensDetails(_Open):
    reasoning_tokens: int | None = None


class PromptTokensDetails(_Open):
    cached_tokens: int | None = None


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class ResponseMessage(_Open):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(_Open):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ToolCallDelta(_Open):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, Any] | None = None


class Delta(_Open):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Open):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(_Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Embedding(_Open):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(_Open):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: dict[str, int]


class ModelCard(_Open):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(_Open):
    error: ErrorDetail
