"""Length limits on what goes to a model: messages per request, characters per message, and prompt
tokens, estimated on the high side (`keel.cost.tokens`), and where the estimate is over the limit
counted with the deployment's own tokenizer where Keel has one (the embedded model: a model whose
deployments are all local), so no prompt is refused on an estimate Keel could have checked. The
verdict says which way the tokens were counted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from keel.config import InputGuardrailsConfig
from keel.cost.tokens import prompt_tokens
from keel.errors import GuardrailViolation
from keel.guardrails.texts import Piece
from keel.guardrails.verdicts import Verdict
from keel.types import ChatRequest

TokenCounter = Callable[[ChatRequest], int | None]  # None: this deployment has no tokenizer Keel can use


async def check_length(
    request: ChatRequest, texts: list[Piece], limits: InputGuardrailsConfig, counter: TokenCounter | None
) -> Verdict | None:
    """Raise `GuardrailViolation` (check `length`) over a limit; a verdict with the count otherwise."""
    messages = len(request.messages)
    if limits.max_messages is not None and messages > limits.max_messages:
        raise _too_long(f"{messages} messages; this model takes at most {limits.max_messages} per request")
    if limits.max_message_chars is not None:
        sizes: dict[int, int] = {}
        for piece in texts:
            sizes[piece.message] = sizes.get(piece.message, 0) + len(piece.text)
        for index, size in sizes.items():
            if size > limits.max_message_chars:
                raise _too_long(
                    f"messages[{index}] has {size} characters; this model takes at most {limits.max_message_chars} "
                    "per message", param=f"messages[{index}].content",
                )
    if limits.max_input_tokens is None:
        return None
    tokens, method = prompt_tokens(request), "estimate"
    if tokens > limits.max_input_tokens and counter is not None:
        # The estimate errs high, so only a prompt it puts over the limit is counted exactly (off the loop).
        if (counted := await asyncio.to_thread(counter, request)) is not None:
            tokens, method = counted, "tokenizer"
    if tokens > limits.max_input_tokens:
        raise _too_long(
            f"the prompt has {tokens} tokens ({'counted' if method == 'tokenizer' else 'estimated'}); this model "
            f"takes at most {limits.max_input_tokens}: shorten the messages or send fewer"
        )
    return Verdict("input", "length", "allow", reasons=[f"{tokens} tokens by {method}"])


def _too_long(message: str, param: str | None = "messages") -> GuardrailViolation:
    error = GuardrailViolation(f"Input too long: {message}.", check="length", direction="input")
    error.param = param
    return error
