"""Legacy text completions (`POST /v1/completions`) as the one internal call, and back.

A completions request becomes a chat request whose one user message is the prompt: the models behind
Keel are chat models, so they answer the prompt as a chat turn (LiteLLM does the same). The answer, and
each chunk of a stream, goes back as OpenAI's `text_completion` object.

A list of prompts (a batch, up to `MAX_PROMPTS`) becomes one chat request per prompt: each is a call of
its own through the pipeline (its own record in the request log, budget charge and cache lookup), run
side by side by keel.server.completions_api, and the answers come back as one `text_completion` whose
choice `index` is the prompt's place in the list (OpenAI's numbering with `n` = 1).

What cannot be carried is refused with a 400 naming the field, never dropped: token-id prompts, `suffix`,
`logprobs`, `best_of` above 1. Everything else maps one to one (`max_tokens`,
`temperature`, `top_p`, `n`, `stop`, `stream`, `stream_options`, `user`, `seed`, the penalties,
`logit_bias`, `metadata`); `echo` is done here, by putting the prompt before the answer.

Plain dictionaries on the hot path: the body parsed once by the gateway, validated once as a chat
request, and each answer or chunk serialised once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from keel.errors import InvalidRequest, KeelError
from keel.pipeline import ChunkStream
from keel.providers.sse import DONE, encode_chunk, encode_error
from keel.request_errors import json_kind, parse_request
from keel.types import ChatRequest

__all__ = [
    "DEFAULT_MAX_TOKENS", "MAX_PROMPTS", "Translated", "error_event", "text_completion", "text_completion_events",
    "translated",
]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat has none)

# Fields of a completions request that are not chat's: handled here, never passed on.
_OWN = frozenset(("prompt", "suffix", "echo", "best_of", "logprobs"))

# Chat's finish reasons in the three a text_completion may give (tools cannot be asked for here).
_FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter"}


MAX_PROMPTS = 64  # prompts in one request: each is a call of its own; more is a job for a batch client


@dataclass(frozen=True, slots=True)
class Translated:
    """The chat requests a completions request became (one per prompt, in order), and the prompts to echo
    before the answers (None without `echo`)."""

    requests: tuple[ChatRequest, ...]
    echoes: tuple[str, ...] | None


def translated(data: Any) -> Translated:
    """The completions body `data` (parsed JSON) as a chat request, or an InvalidRequest naming the
    field at fault."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"The request body must be a JSON object ({{...}}), got {json_kind(data)}.")
    _refuse_unsupported(data)
    prompts = prompt_texts(data.get("prompt", _MISSING))
    chat = {name: value for name, value in data.items() if name not in _OWN}
    if chat.get("max_tokens") is None:
        chat["max_tokens"] = DEFAULT_MAX_TOKENS
    echo = data.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise InvalidRequest(f"Invalid type for 'echo': expected a boolean, got {json_kind(echo)}.", param="echo")
    # Strict, as for chat: JSON types as OpenAI documents them. Shared fields keep their names, so an
    # error names the field as the client wrote it.
    requests = tuple(parse_request(ChatRequest, {**chat, "messages": [{"role": "user", "content": prompt}]},
                                   strict=True) for prompt in prompts)
    return Translated(requests, prompts if echo else None)


_MISSING: Any = object()


def prompt_texts(prompt: Any) -> tuple[str, ...]:
    """The prompts of a request: a string, or a list of one to `MAX_PROMPTS` strings."""
    if isinstance(prompt, str):
        return (prompt,)
    if prompt is _MISSING or prompt is None:
        raise InvalidRequest("Missing required parameter 'prompt'.", param="prompt")
    if isinstance(prompt, list):
        if prompt and all(isinstance(item, str) for item in prompt):
            if len(prompt) > MAX_PROMPTS:
                raise InvalidRequest(
                    f"Invalid value for 'prompt': at most {MAX_PROMPTS} prompts per request (each is a call of "
                    f"its own), got {len(prompt)}. Split the list over several requests.", param="prompt")
            return tuple(prompt)
        if prompt and all(isinstance(item, (int, list)) and not isinstance(item, bool) for item in prompt):
            raise InvalidRequest(
                "Invalid value for 'prompt': token ids are not accepted (Keel's models may each use another "
                "tokenizer). Send the prompt as a string.", param="prompt",
            )
        if not prompt:
            raise InvalidRequest("Invalid value for 'prompt': it must hold at least one string, got an empty array.",
                                 param="prompt")
        raise InvalidRequest("Invalid value for 'prompt': a list of prompts must hold strings only.", param="prompt")
    got = "an object" if isinstance(prompt, dict) else json_kind(prompt)
    raise InvalidRequest(f"Invalid type for 'prompt': expected a string, got {got}.", param="prompt")


def _refuse_unsupported(data: dict[str, Any]) -> None:
    if data.get("suffix") is not None:
        raise InvalidRequest(
            "'suffix' is not supported: Keel's models answer the prompt as a chat turn and cannot insert text "
            "before a suffix. Leave 'suffix' out, or put the text that follows into the prompt.", param="suffix",
        )
    if data.get("logprobs") is not None:
        raise InvalidRequest(
            "'logprobs' is not supported on /v1/completions. Leave it out (or null); for token log "
            "probabilities use /v1/chat/completions with 'logprobs': true.", param="logprobs",
        )
    best_of = data.get("best_of")
    if best_of is not None and best_of != 1:
        raise InvalidRequest(
            f"'best_of' above 1 is not supported (got {best_of!r}): Keel makes one generation per request. "
            "Leave 'best_of' out or send 1.", param="best_of",
        )
    if "messages" in data:
        raise InvalidRequest(
            "'messages' is not a parameter of /v1/completions: send the text as 'prompt', or send the "
            "messages to /v1/chat/completions.", param="messages",
        )


def completion_id(chat_id: str | None) -> str:
    """`cmpl-…` for OpenAI's `chatcmpl-…`: the same call, under the id the completions API uses."""
    if not chat_id:
        return "cmpl-"
    return "cmpl-" + chat_id.removeprefix("chatcmpl-")


def text_completion(completion: dict[str, Any], echoes: Sequence[str] | None = None) -> dict[str, Any]:
    """A chat.completion as the `text_completion` object a non-streamed call answers with: one choice per
    prompt (a batch's answers come merged, each choice at its prompt's index), each after its echo."""
    choices = []
    for choice in completion["choices"]:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        text = message.get("content") or message.get("refusal") or ""
        choices.append({"text": echoes[index] + text if echoes else text, "index": index, "logprobs": None,
                        "finish_reason": _FINISH.get(choice.get("finish_reason"), "stop")})
    body: dict[str, Any] = {
        "id": completion_id(completion.get("id")), "object": "text_completion",
        "created": completion.get("created"), "model": completion.get("model"), "choices": choices,
    }
    if completion.get("usage"):
        body["usage"] = completion["usage"]
    if isinstance(completion.get("system_fingerprint"), str):
        body["system_fingerprint"] = completion["system_fingerprint"]
    return body


async def text_completion_events(stream: ChunkStream, echoes: Sequence[str] | None = None) -> AsyncIterator[bytes]:
    """A stream of chat.completion chunks as `text_completion` chunks, then `[DONE]`, as OpenAI sends them:
    one chunk per piece of text (`finish_reason` null), one with the finish reason, and the usage chunk
    (`choices` empty) when the client asked for it. A batch's chunks carry their prompt's index; with
    `echoes`, a prompt's echo goes before its first piece."""
    head: dict[str, Any] | None = None
    echoed: set[int] = set()
    async for chunk in stream:
        if head is None:
            head = {"id": completion_id(chunk.get("id")), "object": "text_completion",
                    "created": chunk.get("created"), "model": chunk.get("model")}
            if isinstance(chunk.get("system_fingerprint"), str):
                head["system_fingerprint"] = chunk["system_fingerprint"]
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            index = choice.get("index", 0)
            if echoes and index not in echoed:
                echoed.add(index)
                yield encode_chunk({**head, "choices": [_choice(echoes[index], None, index)]})
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("refusal")
            finish = choice.get("finish_reason")
            if text or finish:
                out: dict[str, Any] = {**head, "choices": [
                    _choice(text or "", None if finish is None else _FINISH.get(finish, "stop"), index)]}
                if chunk.get("usage"):
                    out["usage"] = chunk["usage"]
                yield encode_chunk(out)
        elif chunk.get("usage"):
            yield encode_chunk({**head, "choices": [], "usage": chunk["usage"]})
    yield DONE


def _choice(text: str, finish: str | None, index: int) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}


def error_event(exc: KeelError) -> bytes:
    """A failure after the first chunk, as OpenAI sends one inside a stream."""
    return encode_error(exc.body())
