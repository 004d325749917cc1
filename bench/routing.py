"""Tiered routing: cost saved and quality kept against always using the top tier.

    .venv/bin/python bench/routing.py [--requests 400] [--hard-share 0.35] [--seed 7]
    .venv/bin/python bench/routing.py --local [--requests 60]     # the embedded model as the cheap tier

A labelled mix of easy and hard chat requests goes through Keel in-process to a small test-only
OpenAI-compatible upstream (served by this script) with three models of known quality and price:

- `fast`  ($0.15 / $0.60 per 1M tokens, as gpt-4o-mini): a good answer to an easy request 97% of the
  time, to a hard one 25%; it sends token logprobs, lower on its bad answers (with overlap);
- `smart` ($2.50 / $10 per 1M, as gpt-4o): good 99% on easy, 93% on hard;
- `judge` (fast's price): asked "is this answer adequate? yes/no", right 95% of the time.

Whether an answer is good is drawn per (request, tier) from a seeded generator, so every strategy
sees the same answers; an answer carries its verdict (`GOOD`/`BAD`) for scoring, and the judge and
logprobs are the only signals the router gets. Quality = the share of good final answers; cost =
every call's cost in the request log, the judge's calls and the discarded cascade answers included.

Each request carries the same system prompt and documentation (~700 tokens), as production
chat requests do, so the prompt is a large part of every call's cost; `--no-system` sends the user
turn alone, where long hard answers dominate the cost and a cascade saves much less (figures in
docs/routing.md). The hard requests are not all keyword-rich: a third are short and plainly worded ("Is 2^61-1
prime?"), which the text-feature score misses. The figures are for this simulation; on real
traffic measure quality with `keel eval`.

`--local`: the cheap tier is the embedded model (`provider: local`, SmolLM2-135M-Instruct, greedy,
answers cut at 64 tokens), the top tier and the judge simulated as above. Its answers are real, so
they are graded by answer key: an easy request's answer is good when it contains one of the
accepted words as a whole word ("Paris", "Saturday", the sum); a hard request has no key and the
embedded model's answer to it counts as bad (a 135M model does not prove theorems or debug code;
this is generous to the top tier only). The judge is right 95% of the time against that key. The
embedded model is priced at what its CPU time costs: LOCAL_PRICE, $0.20 / $0.50 per 1M tokens, is 2
vCPUs at $0.04 per vCPU-hour over its speed measured on a busy 2-core machine (about 120 prompt and
45 answer tokens/s), about gpt-4o-mini's price. Requests go without the system prompt (with its
~1,100 tokens a call takes ~10 s on two cores), and the logprob cascades are not run: the embedded
model gives no logprobs. ~3 min for 60 requests on two cores.

Target (the issue's): >= 50% cost saved at >= 95% of the top tier's quality.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from keel import Keel
from keel.config import TracingConfig, parse_config
from keel.observability.metrics import Metrics
from keel.observability.record import RequestRecord, SpanRecord
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing
from keel.pipeline import Completion, Context
from keel.types import ChatRequest

FAST_GOOD = {"easy": 0.97, "hard": 0.25}
SMART_GOOD = {"easy": 0.99, "hard": 0.93}
JUDGE_RIGHT = 0.95
ANSWER_TOKENS = {"easy": 40, "hard": 300}
LOCAL_PRICE = (0.20, 0.50)  # USD per 1M tokens: the embedded model's CPU time (module docstring)

CAPITAL = {"France": "Paris", "Peru": "Lima", "Japan": "Tokyo", "Kenya": "Nairobi", "Chile": "Santiago"}
CONTINENT = {"Peru": "South America", "Japan": "Asia", "Kenya": "Africa", "Chile": "South America"}
FRENCH = {"house": ("maison",), "river": ("rivière", "riviere", "fleuve"),
          "quiet": ("calme", "tranquille", "silencieux", "silencieuse"), "ledger": ("grand livre", "registre")}
SYNONYM = {"house": ("home", "dwelling", "residence", "abode", "building"),
           "river": ("stream", "creek", "brook", "waterway", "tributary"),
           "quiet": ("silent", "calm", "still", "hushed", "peaceful", "tranquil", "soft"),
           "ledger": ("record", "register", "account book", "journal", "log", "book")}
NEXT_DAY = {"Monday": "Tuesday", "Friday": "Saturday"}
Key = Callable[[dict[str, Any]], tuple[str, ...]]  # a request's values -> words any of which makes a good answer

# Each easy request with its answer key (used to grade real answers: the embedded model's).
EASY: list[tuple[str, Key]] = [
    ("What is the capital of {country}?", lambda v: (CAPITAL[v["country"]],)),
    ("Translate '{word}' into French.", lambda v: FRENCH[v["word"]]),
    ("Say hello to {name}.", lambda v: (v["name"],)),
    ("What is {a} plus {b}?", lambda v: (str(v["a"] + v["b"]),)),
    ("Give me a synonym for '{word}'.", lambda v: SYNONYM[v["word"]]),
    ("Spell '{word}' backwards.", lambda v: (v["word"][::-1],)),
    ("Is {country} in Europe?", lambda v: ("yes", "European") if v["country"] == "France"
     else ("no", "not", CONTINENT[v["country"]])),
    ("What day comes after {day}?", lambda v: (NEXT_DAY[v["day"]],)),
    ("Write a one-line greeting for {name}.", lambda v: (v["name"],)),
]
HARD_WORDY = [
    "Prove step by step that the sum of the first {a} odd numbers is a perfect square, and explain why "
    "the argument generalises. What breaks for even numbers?",
    "Debug this code and explain the complexity of the fix:\n```\ndef f(xs):\n    for i in range(len(xs)):\n"
    "        xs.remove(xs[i])\n    return xs\n```\nWhy does it fail on {a} items?",
    "Compare the trade-offs of optimistic and pessimistic locking for a {word} service with {a} writers, "
    "and design the retry policy. Which would you choose, and why?",
    "Derive the probability that {a} dice sum to at least {b}, and analyze how the answer scales.",
]
HARD_PLAIN = ["Is 2^{a}-1 prime?", "Who would win, {name} or a {word}, and by how much?",
              "Name the {a}th word of the longest {word} poem."]
FILL = {"country": ["France", "Peru", "Japan", "Kenya", "Chile"], "word": ["house", "river", "quiet", "ledger"],
        "name": ["Ada", "Linus", "Grace", "Ken"], "day": ["Monday", "Friday"]}


@dataclass(frozen=True, slots=True)
class Item:
    id: int
    text: str
    difficulty: str  # easy | hard
    accepts: tuple[str, ...] = ()  # an easy request's answer key; hard ones have none


def dataset(count: int, hard_share: float, seed: int) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(count):
        hard = rng.random() < hard_share
        plain = hard and rng.random() < 1 / 3
        values = {k: rng.choice(v) for k, v in FILL.items()} | {"a": rng.randint(3, 99), "b": rng.randint(3, 99)}
        if hard:
            items.append(Item(i, f"[{i}] " + rng.choice(HARD_PLAIN if plain else HARD_WORDY).format(**values), "hard"))
        else:
            template, key = rng.choice(EASY)
            items.append(Item(i, f"[{i}] " + template.format(**values), "easy", key(values)))
    return items


SIMULATED = re.compile(r"(GOOD|BAD) answer to \d+ by ")


def good_answer(item: Item, content: str) -> bool:
    """A simulated tier's answer carries its verdict; a real one (the embedded model's) is good when
    it contains an accepted word of the item's key as a whole word (a hard item has no key: bad)."""
    if (verdict := SIMULATED.match(content)) is not None:
        return verdict.group(1) == "GOOD"
    return any(re.search(rf"\b{re.escape(word)}\b", content, re.IGNORECASE) for word in item.accepts)


def _draw(*parts: object) -> float:
    """A uniform draw in [0, 1) fixed by its parts: every strategy sees the same answers."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Upstream:
    """The test-only upstream: `fast`, `smart` and `judge`, answering by the labels it was given."""

    def __init__(self, items: list[Item], seed: int) -> None:
        self.by_id = {item.id: item for item in items}
        self.seed = seed
        self.app = web.Application()
        self.app.add_routes([web.post("/v1/chat/completions", self.chat)])

    def item_of(self, text: str) -> Item | None:
        if text.startswith("[") and "]" in text:
            return self.by_id.get(int(text[1:text.index("]")]))
        return None

    async def chat(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        model, text = body["model"], body["messages"][-1]["content"]
        prompt = sum(len(str(m.get("content") or "")) for m in body["messages"]) // 4
        if model == "judge":  # the prompt is keel.routing.cascade.JUDGE_PROMPT
            asked = self.item_of(text.split("Request:\n", 1)[-1])
            answer = text.rsplit("Answer:\n", 1)[-1].rsplit("\n\nIs this answer adequate?", 1)[0]
            assert asked is not None, text
            good = good_answer(asked, answer)
            right = _draw(self.seed, "judge", text) < JUDGE_RIGHT
            return self._answer(model, "yes" if good == right else "no", prompt, 1, None)
        item = self.item_of(text)
        assert item is not None, text
        good = _draw(self.seed, model, item.id) < (FAST_GOOD if model == "fast" else SMART_GOOD)[item.difficulty]
        tokens = ANSWER_TOKENS[item.difficulty]
        logprobs = None
        if model == "fast":  # good answers sure of themselves, bad ones less (the two overlap)
            mean = (-0.35 if good else -1.4) + (_draw(self.seed, "lp", item.id) - 0.5) * 1.2
            logprobs = {"content": [{"token": "t", "logprob": mean, "bytes": None, "top_logprobs": []}]}
        content = f"{'GOOD' if good else 'BAD'} answer to {item.id} by {model}"
        return self._answer(model, content, prompt, tokens, logprobs)

    @staticmethod
    def _answer(model: str, content: str, prompt: int, completion: int, logprobs: Any) -> web.Response:
        return web.json_response({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop", "logprobs": logprobs}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        })


class Sink:
    """The request log, summed: every call's cost (judge calls included)."""

    def __init__(self) -> None:
        self.nanos = 0
        self.calls = 0

    def submit(self, record: RequestRecord) -> None:
        self.nanos += record.cost_nanousd
        self.calls += 1

    def submit_span(self, span: SpanRecord) -> None:
        pass


def config(base_url: str, local: bool = False) -> dict[str, Any]:
    """The simulated tiers and the routes; `local`: the cheap tier is the embedded model."""
    def model(name: str, price: tuple[float, float]) -> dict[str, Any]:
        return {"name": name, "retry": {"max_attempts": 1}, "deployments": [{
            "provider": "openai", "name": f"{name}-upstream", "base_url": base_url, "model": name,
            "price": {"input": price[0], "output": price[1]}}]}

    tiers = ["local" if local else "fast", "smart"]
    routes: list[dict[str, Any]] = [
        {"name": "by-complexity", "router": {"strategy": "complexity", "tiers": tiers,
                                             "complexity": {"thresholds": [0.3]}}},
        {"name": "cascade-judge", "router": {"strategy": "cascade", "tiers": tiers, "escalate_on": ["judge"],
                                             "judge_model": "judge"}},
    ]
    if local:
        embedded = {"name": "local", "retry": {"max_attempts": 1}, "deployments": [{
            "provider": "local", "name": "smollm2", "n_threads": 2, "default_max_tokens": 64,
            "price": {"input": LOCAL_PRICE[0], "output": LOCAL_PRICE[1]}}]}
        return {"models": [embedded, model("smart", (2.50, 10.0)), model("judge", (0.15, 0.60)), *routes],
                "store": {"url": "sqlite:///:memory:"}}
    return {"models": [
        model("fast", (0.15, 0.60)), model("smart", (2.50, 10.0)), model("judge", (0.15, 0.60)), *routes,
        {"name": "cascade-logprobs", "router": {"strategy": "cascade", "tiers": tiers,
                                                "escalate_on": ["low_confidence"], "min_logprob": -0.8}},
        {"name": "cascade-both", "router": {"strategy": "cascade", "tiers": tiers,
                                            "escalate_on": ["low_confidence", "judge"], "min_logprob": -1.0,
                                            "judge_model": "judge"}},
    ], "store": {"url": "sqlite:///:memory:"}}


SYSTEM = ("You are the support assistant of a software company. Answer precisely; cite the documentation "
          "below where it applies; say so when you do not know.\n\nDocumentation:\n" + "Lorem ipsum dolor sit "
          "amet, consectetur adipiscing elit. " * 50)


async def run(model: str, items: list[Item], keel: Keel, sink: Sink, system: bool, greedy: bool) -> dict[str, Any]:
    sink.nanos = sink.calls = 0
    good = {"easy": 0, "hard": 0}
    escalated = 0
    started = time.perf_counter()
    for item in items:
        ctx = Context()
        messages = [{"role": "user", "content": item.text}]
        if system:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        # greedy: the embedded model answers the same on every route (the simulated tiers ignore it)
        body: dict[str, Any] = {"model": model, "messages": messages} | ({"temperature": 0} if greedy else {})
        reply = await keel.handle(ChatRequest.model_validate(body), ctx)
        assert isinstance(reply, Completion)
        good[item.difficulty] += good_answer(item, reply.body["choices"][0]["message"]["content"] or "")
        escalated += bool(ctx.route and ctx.route.escalations)
    per_call_ms = (time.perf_counter() - started) * 1000 / len(items)
    return {"good": good, "nanos": sink.nanos, "calls": sink.calls, "escalated": escalated, "ms": per_call_ms}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=None, help="default: 400, or 60 with --local")
    parser.add_argument("--hard-share", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-system", action="store_true",
                        help="send the user turn alone (no system prompt and documentation)")
    parser.add_argument("--local", action="store_true",
                        help="the embedded model (SmolLM2-135M) as the cheap tier; implies --no-system")
    args = parser.parse_args()
    no_system = args.no_system or args.local
    cheap = "local" if args.local else "fast"
    items = dataset(args.requests or (60 if args.local else 400), args.hard_share, args.seed)
    upstream = Upstream(items, args.seed)
    runner = web.AppRunner(upstream.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sink = Sink()
    keel = Keel(parse_config(config(f"http://127.0.0.1:{port}/v1", args.local), warn_unset_keys=False),
                stages=[Observe(sink, Tracing(TracingConfig(to_store=False)), Metrics(), log_content=False)])
    counts = {d: sum(i.difficulty == d for i in items) for d in ("easy", "hard")}
    shown = "no system prompt" if no_system else f"each with a system prompt of ~{len(SYSTEM) // 4} tokens"
    print(f"{len(items)} requests: {counts['easy']} easy, {counts['hard']} hard, {shown} (seed {args.seed})\n")
    results = {}
    try:
        async with keel:
            routes = ("by-complexity", "cascade-judge") if args.local else (
                "by-complexity", "cascade-judge", "cascade-logprobs", "cascade-both")
            for model in ("smart", cheap, *routes):
                results[model] = await run(model, items, keel, sink, system=not no_system, greedy=args.local)
    finally:
        await runner.cleanup()
    top = results["smart"]
    top_quality = sum(top["good"].values()) / len(items)
    print(f"{'route':<18}{'quality':>9}{'kept':>8}{'easy ok':>9}{'hard ok':>9}{'USD/1k calls':>14}"
          f"{'saved':>8}{'escalated':>11}{'Keel ms/call':>14}")
    for model, r in results.items():
        quality = sum(r["good"].values()) / len(items)
        usd = r["nanos"] / 1e9 / len(items) * 1000
        saved = 1 - r["nanos"] / top["nanos"]
        print(f"{model:<18}{quality:>9.1%}{quality / top_quality:>8.1%}{r['good']['easy'] / counts['easy']:>9.1%}"
              f"{r['good']['hard'] / counts['hard']:>9.1%}{usd:>14.4f}{saved:>8.1%}{r['escalated']:>11}"
              f"{r['ms']:>14.2f}")
    print("\nkept: quality against always `smart`; saved: cost against always `smart` (judge calls and "
          "discarded answers included); Keel ms/call: the whole call, in-process, upstream on localhost")
    if args.local:
        print(f"local: SmolLM2-135M-Instruct in-process, priced ${LOCAL_PRICE[0]} / ${LOCAL_PRICE[1]} per 1M tokens "
              "(its CPU time); its answers graded by answer key, its answers to hard requests counted bad")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
