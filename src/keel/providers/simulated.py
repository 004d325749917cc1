"""A simulated model with latency and fault injection, for chaos tests of the apps behind Keel.

It answers like an OpenAI model (plain and streamed chat, tool calls, JSON modes, embeddings)
from a template, after a configured latency, and fails on purpose at configured rates with
the same precise errors a real upstream produces, so retries, deadlines, breakers and
fallbacks can be exercised without a network or a model.

Faults are reproducible: each provider owns one seeded RNG and every call draws exactly one
number from it, before anything is awaited, so the same seed and the same sequence of calls
give the same sequence of outcomes even when calls overlap. Latency draws come from a second
RNG derived from the same seed, so changing the latency never changes which calls fail; so do
the draws that break JSON answers on purpose (`invalid_json_rate`, a third RNG, drawn only for
calls that ask for JSON or offer tools).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import random
import re
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import orjson

from keel.config import LatencyDistribution, SimulatedDeployment, SimulatedFault, check_template
from keel.errors import (
    NotSupported,
    UpstreamBadRequest,
    UpstreamConnectionError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamTimeout,
)
from keel.ids import random_hex
from keel.pipeline import Call, ChunkStream, Completion
from keel.providers.base import chunk_body, completion_body, usage_body
from keel.types import ChatRequest, EmbeddingRequest, FunctionDefinition, NamedToolChoice, content_text

DEFAULT_DIMENSIONS = 64
# text-embedding-3-large's size, the largest OpenAI makes; as a real model, the simulated one refuses more
# (the vectors are built in memory: `dimensions` of 10^12 once grew a gateway to 7 GB under Schemathesis).
MAX_DIMENSIONS = 3072
# Long enough that only a deadline ends it; the reliability stage always sets one.
HANG_S = 24 * 3600.0
# Fixed order, so the outcome of a draw does not depend on the key order in keel.yaml.
FAULT_ORDER: tuple[SimulatedFault, ...] = get_args(SimulatedFault)


class SimulatedProvider:
    """The `simulated` deployment: answers from a template, fails on purpose, seeded."""

    def __init__(
        self, config: SimulatedDeployment, name: str, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        self.config = config
        self._sleep = sleep  # every wait goes through it (seconds), so tests can see them without a clock
        self.name = name
        self.template = checked_template(config.template, name)
        self.rng = random.Random(config.seed)
        self._latency_rng = random.Random(None if config.seed is None else f"latency/{config.seed}")
        self._broken_rng = random.Random(None if config.seed is None else f"broken/{config.seed}")
        self._faults = fault_table(config)

    async def start(self) -> None:
        """Nothing to open or load: the simulator lives in this process."""

    async def close(self) -> None:
        """Nothing to release."""

    # ------------------------------------------------------------------ calls

    async def chat(self, request: ChatRequest, call: Call) -> Completion | ChunkStream:
        fault = self.draw_fault()
        broken = self.draw_broken(request)
        await self._sleep_ms(self._latency_ms())
        stream = bool(request.stream)
        # A stream's malformed event and cut connection happen inside the body, after the headers.
        if fault is not None and not (stream and fault in ("malformed", "cut")):
            await self._fail(fault)
        answer = self._answer(request, broken)
        if stream:
            return ChunkStream(self._chunks(request, answer, fault))
        return Completion(self._completion(answer))

    async def embed(self, request: EmbeddingRequest, call: Call) -> Completion:
        fault = self.draw_fault()
        await self._sleep_ms(self._latency_ms())
        if fault is not None:
            await self._fail(fault)
        inputs = embedding_inputs(request.input)
        if not inputs:
            raise UpstreamBadRequest(
                f"deployment '{self.name}' (simulated) refused the request: input must not be empty",
                deployment=self.name,
            )
        dimensions = request.dimensions or DEFAULT_DIMENSIONS
        if dimensions > MAX_DIMENSIONS:
            raise NotSupported(
                f"Invalid value for 'dimensions': {dimensions}. Deployment '{self.name}' (simulated) makes vectors "
                f"of at most {MAX_DIMENSIONS} dimensions, as text-embedding-3-large: send {MAX_DIMENSIONS} or "
                f"fewer, or leave dimensions out for {DEFAULT_DIMENSIONS}.",
                param="dimensions", deployment=self.name,
            )
        data = [
            {"object": "embedding", "index": i, "embedding": encoded(unit_vector(item, dimensions), request)}
            for i, item in enumerate(inputs)
        ]
        tokens = max(1, sum(_input_tokens(item) for item in inputs))
        return Completion({
            "object": "list", "data": data, "model": self.config.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    # ------------------------------------------------------------------ faults and latency

    def draw_fault(self) -> SimulatedFault | None:
        """This call's outcome: one uniform draw against the cumulative fault rates."""
        draw = self.rng.random()
        for fault, ceiling in self._faults:
            if draw < ceiling:
                return fault
        return None

    def draw_broken(self, request: ChatRequest) -> Broken | None:
        """How this call's JSON answer is broken on purpose, if it is: one draw, for JSON calls only."""
        if self.config.invalid_json_rate <= 0 or not (request.tools or _json_format(request)):
            return None
        draw = self._broken_rng.random()
        if draw >= self.config.invalid_json_rate:
            return None
        return "truncated" if draw < self.config.invalid_json_rate / 2 else "wrong_type"

    def _latency_ms(self) -> float:
        return draw_latency_ms(self.config.latency_ms, self._latency_rng)

    async def _sleep_ms(self, ms: float) -> None:
        # No await at all for zero: a simulator with no latency should cost nothing in benchmarks.
        if ms > 0:
            await self._sleep(ms / 1000)

    async def _fail(self, fault: SimulatedFault) -> None:
        """Raise what a real upstream failing this way would make the HTTP provider raise."""
        where = f"deployment '{self.name}' (simulated)"
        if fault in ("500", "503"):
            raise UpstreamServerError(
                f"{where} answered {fault}: simulated server error", upstream_status=int(fault), deployment=self.name
            )
        if fault == "429":
            raise UpstreamRateLimited(
                f"{where} answered 429: simulated rate limit", retry_after=self.config.retry_after_s,
                deployment=self.name,
            )
        if fault == "hang":
            await self._sleep(HANG_S)  # cancellation (a deadline) ends it; nothing here catches it
            raise UpstreamTimeout(f"{where} never answered (simulated hang)", deployment=self.name)
        if fault == "malformed":
            raise UpstreamMalformed(f"{where} answered with a body that is not JSON (simulated)", deployment=self.name)
        # "reset", and "cut" on a call that is not streamed: the connection drops before the answer.
        raise UpstreamConnectionError(f"{where} reset the connection (simulated)", deployment=self.name)

    # ------------------------------------------------------------------ answers

    def _answer(self, request: ChatRequest, broken: Broken | None = None) -> Answer:
        tool = tool_to_call(request, self.name)
        if tool is not None:
            arguments = _attempted(tool.parameters or {"type": "object"})
            text = json.dumps(arguments if isinstance(arguments, dict) else {}, ensure_ascii=False)
        else:
            text = self._text(request)
        if broken is not None and (tool is not None or _json_format(request)):
            # json_object takes any object: only a value that is not one is wrong there
            whole = tool is None and getattr(request.response_format, "type", None) == "json_object"
            text = broken_json(text, broken, whole=whole)
        pieces = word_pieces(text)
        limit = request.output_limit
        truncated = limit is not None and len(pieces) > limit
        if truncated:
            pieces = pieces[:limit]
        finish = "length" if truncated else "tool_calls" if tool is not None else "stop"
        return Answer(
            pieces=pieces, finish_reason=finish, prompt_tokens=prompt_tokens(request),
            tool_name=tool.name if tool is not None else None,
            tool_call_id="call_" + random_hex(12) if tool is not None else None,
        )

    def _text(self, request: ChatRequest) -> str:
        """The answer's text, shaped by response_format when the client asked for JSON."""
        text = self.template.format(**placeholder_values(request, self.config.model))
        response_format = request.response_format
        if response_format is None or response_format.type == "text":
            return text
        if response_format.type == "json_object":
            return json.dumps({"echo": text}, ensure_ascii=False)
        return json.dumps(_attempted(response_format.json_schema.schema_ or {}), ensure_ascii=False)

    def _completion(self, answer: Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        if answer.tool_name is not None:
            message["content"] = None
            message["tool_calls"] = [{
                "id": answer.tool_call_id, "type": "function",
                "function": {"name": answer.tool_name, "arguments": answer.text},
            }]
        return completion_body(
            id=_completion_id(), model=self.config.model, created=int(time.time()), message=message,
            finish_reason=answer.finish_reason, usage=answer.usage(),
        )

    async def _chunks(
        self, request: ChatRequest, answer: Answer, fault: SimulatedFault | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Role chunk, one chunk per word, the finish chunk, then usage if the client asked for it."""
        id, created, model = _completion_id(), int(time.time()), self.config.model
        await self._sleep_ms(self.config.ttft_ms)
        if fault == "malformed":
            raise UpstreamMalformed(
                f"deployment '{self.name}' (simulated) sent a stream event that is not JSON", deployment=self.name
            )
        yield chunk_body(id=id, model=model, created=created, delta=answer.first_delta())
        pieces = answer.pieces[: len(answer.pieces) // 2] if fault == "cut" else answer.pieces
        for piece in pieces:
            await self._sleep_ms(self.config.token_delay_ms)
            yield chunk_body(id=id, model=model, created=created, delta=answer.piece_delta(piece))
        if fault == "cut":
            raise UpstreamConnectionError(
                f"deployment '{self.name}' (simulated) dropped the stream mid-answer", deployment=self.name
            )
        yield chunk_body(id=id, model=model, created=created, delta={}, finish_reason=answer.finish_reason)
        # Always sent: cost needs it; ChunkStream.hide_usage keeps it from clients that did not ask.
        yield chunk_body(id=id, model=model, created=created, delta={}, usage=answer.usage())


@dataclass(slots=True, frozen=True)
class Answer:
    """What the simulated model says to one call, before it is shaped as a body or chunks."""

    pieces: list[str]  # words with their spaces: they join back to the exact text
    finish_reason: str
    prompt_tokens: int
    tool_name: str | None = None  # set when the answer is a tool call; the text is its arguments
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def usage(self) -> dict[str, Any]:
        return usage_body(self.prompt_tokens, len(self.pieces))

    def first_delta(self) -> dict[str, Any]:
        if self.tool_name is None:
            return {"role": "assistant", "content": ""}
        return {"role": "assistant", "content": None, "tool_calls": [{
            "index": 0, "id": self.tool_call_id, "type": "function",
            "function": {"name": self.tool_name, "arguments": ""},
        }]}

    def piece_delta(self, piece: str) -> dict[str, Any]:
        if self.tool_name is None:
            return {"content": piece}
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


Broken = Literal["truncated", "wrong_type"]


def _json_format(request: ChatRequest) -> bool:
    return request.response_format is not None and request.response_format.type != "text"


def broken_json(text: str, how: Broken, *, whole: bool = False) -> str:
    """A JSON answer broken on purpose: cut in half (no longer JSON), or with a value of the wrong
    type (the first property's; the whole value when it has none, or when `whole`)."""
    if how == "truncated":
        return text[: max(1, len(text) // 2)]
    value = json.loads(text)
    if whole:
        value = [value]
    elif isinstance(value, dict) and value:
        first = next(iter(value))
        value[first] = _wrong_typed(value[first])
    else:
        value = _wrong_typed(value)
    return json.dumps(value, ensure_ascii=False)


def _wrong_typed(value: Any) -> Any:
    return 12345 if isinstance(value, str) else "not-a-" + type(value).__name__


def _completion_id() -> str:
    return "chatcmpl-sim-" + random_hex(12)


# ---------------------------------------------------------------------------- configuration


def checked_template(template: str, name: str) -> str:
    """The answer template, refused at construction (start-up) when it could fail on a call."""
    try:
        return check_template(template)
    except ValueError as exc:
        raise ValueError(f"deployment '{name}': template {template!r} {exc}") from None


def fault_table(config: SimulatedDeployment) -> list[tuple[SimulatedFault, float]]:
    """(fault, cumulative ceiling) pairs; `error_rate` counts as extra 500s."""
    rates: dict[SimulatedFault, float] = {fault: config.errors.get(fault, 0.0) for fault in FAULT_ORDER}
    rates["500"] += config.error_rate
    table: list[tuple[SimulatedFault, float]] = []
    ceiling = 0.0
    for fault, rate in rates.items():
        if rate > 0:
            ceiling += rate
            table.append((fault, ceiling))
    return table


def draw_latency_ms(spec: float | LatencyDistribution, rng: random.Random) -> float:
    """One latency sample: a fixed number, or a draw clamped to [min_ms, max_ms], never negative."""
    if not isinstance(spec, LatencyDistribution):
        return max(0.0, float(spec))
    value = _sample(spec, rng)
    value = max(value, spec.min_ms)
    if spec.max_ms > 0:
        value = min(value, spec.max_ms)
    return max(0.0, value)


def _sample(spec: LatencyDistribution, rng: random.Random) -> float:
    if spec.kind == "uniform":
        if spec.max_ms > 0:
            return rng.uniform(spec.min_ms, spec.max_ms)
        half_width = math.sqrt(3) * spec.stddev_ms  # same mean and spread as asked
        return rng.uniform(spec.mean_ms - half_width, spec.mean_ms + half_width)
    if spec.kind == "normal":
        return rng.gauss(spec.mean_ms, spec.stddev_ms)
    if spec.kind == "lognormal":
        if spec.mean_ms <= 0:
            return 0.0
        # mean_ms and stddev_ms describe the latency itself, not the underlying normal.
        sigma2 = math.log1p((spec.stddev_ms / spec.mean_ms) ** 2)
        return rng.lognormvariate(math.log(spec.mean_ms) - sigma2 / 2, math.sqrt(sigma2))
    return spec.mean_ms


# ---------------------------------------------------------------------------- request reading


def placeholder_values(request: ChatRequest, model: str) -> dict[str, Any]:
    return {
        "last_user_message": request.last_user_text(),
        "model": model,
        "message_count": len(request.messages),
    }


def prompt_tokens(request: ChatRequest) -> int:
    """A rough token count: the words of every message's text, at least 1."""
    words = sum(len(content_text(message.content).split()) for message in request.messages)
    return max(1, words)


def word_pieces(text: str) -> list[str]:
    """The text cut into words, each keeping the spaces around it, so the pieces join back exactly."""
    pieces = re.findall(r"\s*\S+\s*", text)
    return pieces if pieces or not text else [text]


def tool_to_call(request: ChatRequest, deployment: str) -> FunctionDefinition | None:
    """The function this answer calls, or None for a text answer.

    A call is forced by tool_choice ("required" or a named function); with tool_choice
    absent or "auto", a last user message starting with "call " asks for one, naming the
    function anywhere in it (the first tool otherwise).
    """
    choice = request.tool_choice
    functions = [tool.function for tool in request.tools or ()]
    if choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        named = next((f for f in functions if f.name == choice.function.name), None)
        if named is None:
            raise UpstreamBadRequest(
                f"deployment '{deployment}' (simulated) refused the request: tool_choice names function "
                f"'{choice.function.name}', which is not in tools", deployment=deployment,
            )
        return named
    if choice == "required":
        if not functions:
            raise UpstreamBadRequest(
                f"deployment '{deployment}' (simulated) refused the request: tool_choice is 'required' "
                "but no tools were given", deployment=deployment,
            )
        return functions[0]
    text = request.last_user_text()
    if not functions or not text.lower().startswith("call "):
        return None
    words = set(re.findall(r"[\w.-]+", text))
    return next((f for f in functions if f.name in words), functions[0])


# ---------------------------------------------------------------------------- JSON Schema instances

_MAX_DEPTH = 32
_FORMATS = {
    "date-time": "1970-01-01T00:00:00Z",
    "date": "1970-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "ipv4": "127.0.0.1",
}


MAX_INSTANCE_NODES = 10_000  # values in one minimal instance; a schema asking for more gets none
MAX_INSTANCE_CHARS = 100_000  # characters of its strings and constants, all told


class InstanceTooLarge(ValueError):
    """The smallest value a schema admits is larger than a model answer could be (a `minItems` or
    `minLength` in the millions, a long constant repeated, or nested): the simulated model cannot produce it."""


@dataclass(slots=True)
class _Budget:
    """What one minimal instance may still spend: values, and characters of its strings and constants
    (a `const` of a megabyte is one value, but a thousand copies of it are a gigabyte of answer)."""

    nodes: int = MAX_INSTANCE_NODES
    chars: int = MAX_INSTANCE_CHARS

    def node(self) -> None:
        self.nodes -= 1
        if self.nodes < 0:
            raise InstanceTooLarge(f"the smallest value the schema admits has more than {MAX_INSTANCE_NODES} parts")

    def text(self, characters: int) -> None:
        """Pay for `characters` of a string, or of a constant from the schema, before it is used."""
        self.chars -= characters
        if self.chars < 0:
            raise InstanceTooLarge(
                f"the smallest value the schema admits has more than {MAX_INSTANCE_CHARS} characters of text")

    def constant(self, value: Any) -> Any:
        """`value` (a `const` or `enum` value of the schema), paid for by its length as JSON."""
        self.text(len(value) if isinstance(value, str) else len(json.dumps(value, ensure_ascii=False)))
        return value


def minimal_instance(schema: Any, root: Mapping[str, Any] | None = None, depth: int = 0,
                     budget: _Budget | None = None) -> Any:
    """A small JSON value valid against `schema`: required properties only, shortest arrays,
    zero or the nearest bound for numbers, the first enum value, the first anyOf/oneOf branch.
    InstanceTooLarge past MAX_INSTANCE_NODES values or MAX_INSTANCE_CHARS characters of text."""
    budget = _Budget() if budget is None else budget
    budget.node()
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return None  # `true` (or an unresolved reference): anything goes, null included
    root = schema if root is None else root
    if "const" in schema:
        return budget.constant(schema["const"])
    if schema.get("enum"):
        return budget.constant(schema["enum"][0])
    if "$ref" in schema:
        return minimal_instance(_resolve(schema["$ref"], root), root, depth + 1, budget)
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return minimal_instance(schema[key][0], root, depth + 1, budget)
    if schema.get("allOf"):
        return minimal_instance(_merged(schema, root), root, depth + 1, budget)
    kind = _type_of(schema)
    if kind == "object":
        return _object_instance(schema, root, depth, budget)
    if kind == "array":
        return _array_instance(schema, root, depth, budget)
    if kind == "string":
        length = int(schema.get("minLength", 0))
        budget.text(length)  # before "a" * length is built
        return _FORMATS.get(schema.get("format", ""), "a" * length)
    if kind in ("number", "integer"):
        return _number_instance(schema, integer=kind == "integer")
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return {}


def _attempted(schema: Any) -> Any:
    """The minimal instance, or `{}` where it would be too large: what a model cut short would give, which
    the validation stage then re-asks for and refuses (422 invalid_output), as for a real one."""
    try:
        return minimal_instance(schema)
    except InstanceTooLarge:
        return {}


def _type_of(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        # Prefer a real value to null: ["string", "null"] gives a string.
        return next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if {"properties", "required", "additionalProperties"} & schema.keys():
        return "object"
    if {"items", "prefixItems", "minItems"} & schema.keys():
        return "array"
    return "any"


def _resolve(ref: Any, root: Mapping[str, Any]) -> Any:
    """A local reference ("#/$defs/Name"); anything else resolves to no constraint."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: Any = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _merged(schema: Mapping[str, Any], root: Mapping[str, Any]) -> dict[str, Any]:
    """allOf folded into one schema: properties and required lists combined, other keys first-wins."""
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema["allOf"]:
        part = _resolve(part["$ref"], root) if isinstance(part, Mapping) and "$ref" in part else part
        if not isinstance(part, Mapping):
            continue
        for key, value in part.items():
            if key == "properties":
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required":
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged.setdefault(key, value)
    return merged


def _object_instance(
    schema: Mapping[str, Any], root: Mapping[str, Any], depth: int, budget: _Budget,
) -> dict[str, Any]:
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    names = list(dict.fromkeys(schema.get("required") or ()))
    # minProperties beyond the required ones: add declared properties until it is met.
    for name in properties:
        if len(names) >= int(schema.get("minProperties", 0)):
            break
        if name not in names:
            names.append(name)
    fallback = extra if isinstance(extra, Mapping) else {}
    return {name: minimal_instance(properties.get(name, fallback), root, depth + 1, budget) for name in names}


def _array_instance(schema: Mapping[str, Any], root: Mapping[str, Any], depth: int, budget: _Budget) -> list[Any]:
    items = schema.get("items")
    prefix = schema.get("prefixItems") or (items if isinstance(items, list) else [])
    rest = items if isinstance(items, Mapping) else schema.get("additionalItems", {})
    size = int(schema.get("minItems", 0))
    out = [minimal_instance(part, root, depth + 1, budget) for part in prefix[:size]]
    while len(out) < size:
        out.append(minimal_instance(rest, root, depth + 1, budget))
    return out


def _number_instance(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    """Zero when it fits, else the nearest value inside the bounds (draft 4 and 2020-12 forms)."""
    low, high = schema.get("minimum"), schema.get("maximum")
    low_open, high_open = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    low_excl = low_open is True  # draft 4: a flag on minimum
    high_excl = high_open is True
    if _is_number(low_open):
        low, low_excl = low_open, True
    if _is_number(high_open):
        high, high_excl = high_open, True
    value: float = 0
    if low is not None and (value < low or (low_excl and value == low)):
        value = _just_above(low, high, exclusive=low_excl, integer=integer)
    elif high is not None and (value > high or (high_excl and value == high)):
        value = -_just_above(-high, None if low is None else -low, exclusive=high_excl, integer=integer)
    step = schema.get("multipleOf")
    if integer and isinstance(step, int) and step > 0 and value % step:
        value = math.ceil(value / step) * step
    return int(value) if integer else value


def _just_above(bound: float, other: float | None, *, exclusive: bool, integer: bool) -> float:
    if integer:
        return math.floor(bound) + 1 if exclusive else math.ceil(bound)
    if not exclusive:
        return bound
    return bound + 1 if other is None else (bound + other) / 2


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------------------- embeddings


def embedding_inputs(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """Each input of an embeddings request: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [[int(token) for token in value if isinstance(token, int)]]
    return [item for item in value if not isinstance(item, int)]


def unit_vector(item: str | list[int], dimensions: int) -> list[float]:
    """A deterministic unit vector from a hash of the input, rounded to float32 so the float and
    base64 encodings carry the same numbers."""
    rng = random.Random(hashlib.sha256(orjson.dumps(item)).digest())
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(x / norm for x in raw))
    return list(struct.unpack(f"<{dimensions}f", packed))


def encoded(vector: list[float], request: EmbeddingRequest) -> list[float] | str:
    """base64 of little-endian float32s when asked, as OpenAI sends it."""
    if request.encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def _input_tokens(item: str | list[int]) -> int:
    return len(item.split()) if isinstance(item, str) else len(item)
