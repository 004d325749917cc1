"""Rate limits in one process: the config, which limits a call is counted against, the window
arithmetic, the stage in the pipeline (refusals, token charges and their correction), the headers
the gateway sends, and what happens when the store fails."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
from test_gateway_asgi import Client, scope

from keel.config import ConfigError, KeelConfig, parse_config
from keel.cost.tokens import prompt_tokens
from keel.engine import Keel
from keel.errors import KeelError, RateLimited, RateLimitStoreUnavailable, RequestOverRateLimit
from keel.limits import Limit, MemoryRateLimitBackend, RateLimiter, RateLimitStage, RateLimitState, RateRules, Window
from keel.limits.headers import Reading, duration
from keel.pipeline import Context
from keel.request_errors import parse_request
from keel.server import create_app
from keel.types import ChatRequest

SIM = {"name": "sim", "deployments": [{"provider": "simulated"}]}
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_MASTER_KEY", raising=False)


def config(block: dict[str, Any] | None = None, **model: Any) -> KeelConfig:
    """A config serving `sim` (with `model`'s keys), with `block` as its top-level `limits:`."""
    return parse_config({"models": [{**SIM, **model}], "store": {"url": "sqlite:///keel.db"},
                         **({"limits": block} if block is not None else {})})


def chat(**params: Any) -> ChatRequest:
    return parse_request(ChatRequest, {"model": "sim", "messages": HELLO, **params}, strict=False)


async def call(keel: Keel, ctx: Context | None = None, **params: Any) -> tuple[Context, KeelError | None]:
    ctx = ctx or Context()
    try:
        await keel.handle(chat(**params), ctx)
    except KeelError as exc:
        return ctx, exc
    return ctx, None


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(("limits", "message"), [
    ({"global": {"requests_per_minute": -5}}, "limits.global.requests_per_minute: should be greater than 0, got -5"),
    ({"per_key": {"tokens_per_minute": 0}}, "limits.per_key.tokens_per_minute: should be greater than 0, got 0"),
    ({"per_user": {}}, "limits.per_user: set requests_per_minute, tokens_per_minute or both"),
    ({"per_model": {"requests_per_minute": "100"}}, "write the number without quotes"),
    ({"global": {"requests_per_minute": 1.5}}, "limits.global.requests_per_minute: should be a valid integer"),
    ({"globl": {"requests_per_minute": 1}}, "limits.globl: unknown key 'globl'; did you mean 'global'?"),
    ({"backend": "redis"}, "limits.backend is redis but no Redis is named: set limits.redis_url"),
    ({"on_backend_error": "open"}, "limits.on_backend_error: should be 'fail_open' or 'fail_closed'"),
    ({"redis_url": "localhost:6379"}, "limits.redis_url: must start with redis://"),
])
def test_a_bad_limits_block_stops_start_up_naming_the_key(limits: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(limits)
    assert message in str(caught.value)


def test_a_models_own_limits_are_checked_the_same_way() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.limits\.per_key\.requests_per_minute: should be greater"):
        config(None, limits={"per_key": {"requests_per_minute": 0}})
    with pytest.raises(ConfigError, match=r"models\[0\]\.limits\.per_model\.requests_per_minute: should be greater"):
        config(None, limits={"per_model": {"requests_per_minute": -1}})


def test_the_issues_block_is_valid_as_written() -> None:
    limits = config({
        "backend": "memory", "redis_url": "redis://127.0.0.1:6379/0", "on_backend_error": "fail_open",
        "global": {"requests_per_minute": 6000, "tokens_per_minute": 2000000}, "per_key": {"requests_per_minute": 600},
    }).limits
    assert limits.global_ is not None and limits.global_.tokens_per_minute == 2_000_000
    assert limits.per_key is not None and limits.per_key.requests_per_minute == 600


# ---------------------------------------------------------------------------- which limits apply


def described(limits: list[Limit]) -> set[tuple[str, str, int, tuple[str, ...]]]:
    return {(limit.scope, limit.kind, limit.amount, limit.identifiers) for limit in limits}


def test_each_scope_counts_on_its_own_counter_and_a_call_without_key_or_user_skips_those() -> None:
    rules = RateRules.from_config(config({
        "global": {"requests_per_minute": 100}, "per_key": {"requests_per_minute": 10},
        "per_user": {"tokens_per_minute": 500}, "per_model": {"requests_per_minute": 50},
    }))
    full = rules.for_call("sim", "vk_1", "alice")
    assert {(s, k, a) for s, k, a, _ in described(full)} == {
        ("global", "requests", 100), ("key", "requests", 10), ("user", "tokens", 500), ("model", "requests", 50)}
    assert ("key", "vk_1") in {limit.identifiers for limit in full}
    user = next(limit for limit in full if limit.scope == "user")
    assert "alice" not in user.key  # client-given names are hashed into the key
    assert {limit.scope for limit in rules.for_call("sim", None, None)} == {"global", "model"}
    assert rules.for_call("unknown-model", "vk_1", "alice") == []


def test_a_models_own_entry_replaces_the_default_field_by_field_on_a_counter_of_its_own() -> None:
    cfg = parse_config({"store": {"url": "sqlite:///keel.db"}, "limits": {
        "per_key": {"requests_per_minute": 600, "tokens_per_minute": 10_000}, "per_model": {"requests_per_minute": 50}},
        "models": [
            {**SIM, "limits": {"per_key": {"requests_per_minute": 6}, "per_model": {"requests_per_minute": 5}}},
            {"name": "other", "deployments": [{"provider": "simulated"}]},
        ]})
    rules = RateRules.from_config(cfg)
    assert described(rules.for_call("sim", "vk_1", None)) == {
        ("key", "requests", 6, ("key", "vk_1", "model", "sim")),  # this model's calls, apart
        ("key", "tokens", 10_000, ("key", "vk_1")),  # not overridden: the key's one counter
        ("model", "requests", 5, ("model", "sim")),
    }
    assert described(rules.for_call("other", "vk_1", None)) == {
        ("key", "requests", 600, ("key", "vk_1")), ("key", "tokens", 10_000, ("key", "vk_1")),
        ("model", "requests", 50, ("model", "other")),
    }


def test_a_virtual_keys_own_limits_replace_the_default_per_key_ones() -> None:
    class KeyLimits:
        requests_per_minute = 3
        tokens_per_minute = None

    rules = RateRules.from_config(config({"per_key": {"requests_per_minute": 600, "tokens_per_minute": 9000}}))
    assert described(rules.for_call("sim", "vk_1", None, KeyLimits())) == {
        ("key", "requests", 3, ("key", "vk_1")), ("key", "tokens", 9000, ("key", "vk_1"))}
    # Even with no default at all, a key's own limit applies.
    assert described(RateRules.from_config(config({})).for_call("sim", "vk_1", None, KeyLimits())) == {
        ("key", "requests", 3, ("key", "vk_1"))}


# ---------------------------------------------------------------------------- the window arithmetic


def test_a_windows_remaining_reset_and_wait_follow_the_sliding_count() -> None:
    # 30 s into a window: the previous one (40 counted) still weighs half; 20 counted in this one.
    window = Window(previous_count=40, previous_ttl=30, current_count=20, current_ttl=90, expiry=60, read_at=1000)
    assert window.used == 40 and window.remaining(100) == 60 and window.remaining(30) == 0
    assert window.reset_in() == 90 and window.shift_at == 1030
    assert window.wait_for(1, 100) == 0
    # For 1 more under a limit of 40: the previous count must fade to 19 of weight: 30 - 19*60/40 = 1.5 s.
    assert window.wait_for(1, 40) == pytest.approx(1.5)
    # Under 15 the current 20 is too much: after the shift (30 s) it fades over a minute to 14.
    assert window.wait_for(1, 15) == pytest.approx(30 + 60 * (1 - 14 / 20))
    assert Window(0, 0, 0, 0, 60, 0).reset_in() == 0


@pytest.mark.parametrize(("seconds", "text"), [
    (0.02, "20ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (90.25, "1m30.25s")])
def test_resets_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_the_headers_name_the_tightest_limit_of_each_kind() -> None:
    state = RateLimitState(requests=Reading(600, 599, 59.5), tokens=None)
    assert dict(state.headers()) == {
        b"x-ratelimit-limit-requests": b"600", b"x-ratelimit-remaining-requests": b"599",
        b"x-ratelimit-reset-requests": b"59.5s"}


# ---------------------------------------------------------------------------- the stage


async def test_a_call_over_its_requests_limit_gets_429_with_the_wait_and_the_state_for_the_headers() -> None:
    keel = Keel(config({"global": {"requests_per_minute": 3}, "per_key": {"requests_per_minute": 100}}))
    for i in range(3):
        ctx, error = await call(keel, Context(key_id="vk_1"))
        assert error is None
        assert ctx.rate_limit is not None and ctx.rate_limit.requests is not None
        assert (ctx.rate_limit.requests.limit, ctx.rate_limit.requests.remaining) == (3, 2 - i)  # the tighter one
    ctx, error = await call(keel, Context(key_id="vk_1"))
    await keel.close()
    assert isinstance(error, RateLimited) and error.status == 429 and error.code == "rate_limit_exceeded"
    assert error.scope == "global" and error.kind == "requests"
    assert "Rate limit reached for all calls on requests per minute (RPM): limit 3, used 3" in error.message
    assert error.retry_after is not None and 0 < error.retry_after <= 120  # at most two windows
    headers = error.headers()
    assert headers["x-should-retry"] == "true" and int(headers["retry-after"]) >= 1
    assert ctx.rate_limit is not None and ctx.rate_limit.requests == Reading(3, 0, ctx.rate_limit.requests.reset_s)


async def test_tokens_are_charged_up_front_and_corrected_to_what_the_call_used() -> None:
    keel = Keel(config({"global": {"tokens_per_minute": 1000}}))
    limiter = keel.rate_limits
    assert limiter is not None
    ctx, error = await call(keel, max_tokens=200)
    assert error is None and ctx.rate_limit is not None and ctx.rate_limit.tokens is not None
    estimate = prompt_tokens(chat()) + 200
    assert ctx.rate_limit.tokens.remaining == 1000 - estimate  # what the answer's headers say
    used = ctx.cost.usage["prompt_tokens"] + ctx.cost.usage["completion_tokens"]  # type: ignore[index]
    limit = limiter.rules.for_call("sim", None, None)[0]
    assert (await limiter.backend.window(limit)).used == used  # settled: the estimate became the actual
    await keel.close()


async def test_a_burst_of_long_answers_cannot_slip_through_on_short_prompts() -> None:
    keel = Keel(config({"global": {"tokens_per_minute": 1000}}, deployments=[
        {"provider": "simulated", "latency_ms": 50}]))
    results = await asyncio.gather(*(call(keel, max_tokens=300) for _ in range(10)))
    await keel.close()
    assert sum(error is None for _, error in results) == 3  # 3 x (300 + prompt) fit in 1000, a 4th does not


async def test_a_stream_is_corrected_when_it_ends() -> None:
    keel = Keel(config({"global": {"tokens_per_minute": 5000}}))
    assert keel.rate_limits is not None
    stream = await keel.chat(messages=HELLO, model="sim", stream=True, max_tokens=1000)
    limit = keel.rate_limits.rules.for_call("sim", None, None)[0]
    assert (await keel.rate_limits.backend.window(limit)).used == prompt_tokens(chat()) + 1000  # held while it runs
    async for _ in stream:
        pass
    used = (await keel.rate_limits.backend.window(limit)).used
    await keel.close()
    assert 0 < used < 50


async def test_a_failed_call_hands_back_the_tokens_it_did_not_use() -> None:
    keel = Keel(config({"global": {"tokens_per_minute": 5000}}, deployments=[
        {"provider": "simulated", "errors": {"500": 1.0}}], retry={"max_attempts": 1}))
    assert keel.rate_limits is not None
    _, error = await call(keel, max_tokens=1000)
    assert error is not None and error.status == 502
    limit = keel.rate_limits.rules.for_call("sim", None, None)[0]
    assert (await keel.rate_limits.backend.window(limit)).used == 0
    await keel.close()


async def test_a_refused_call_reserves_no_money_and_hands_back_its_other_hits() -> None:
    cfg = parse_config({"models": [SIM], "store": {"url": "sqlite:///keel.db"},
                        "budgets": [{"scope": "global", "limit_usd": 100}],
                        "limits": {"global": {"tokens_per_minute": 10_000}, "per_user": {"requests_per_minute": 1}}})
    keel = Keel(cfg)
    assert keel.rate_limits is not None
    reserved: list[Any] = []
    reserve = keel.budgets.reserve

    async def spy(*args: Any, **kwargs: Any) -> Any:
        reserved.append(args)
        return await reserve(*args, **kwargs)

    keel.budgets.reserve = spy  # type: ignore[method-assign]
    assert (await call(keel, user="ann"))[1] is None
    assert len(reserved) == 1
    _, error = await call(keel, user="ann", max_tokens=100)
    assert isinstance(error, RateLimited) and error.scope == "user"
    assert len(reserved) == 1  # the budget stage never saw it
    tokens = next(limit for limit in keel.rate_limits.rules.for_call("sim", None, "ann") if limit.kind == "tokens")
    used_by_first = (await keel.rate_limits.backend.window(tokens)).used
    assert used_by_first < 100  # the refused call's 100+ tokens were handed back
    await keel.close()


async def test_a_prompt_that_can_never_fit_is_refused_for_good_and_a_default_allowance_is_lowered() -> None:
    keel = Keel(config({"per_key": {"tokens_per_minute": 100}}))
    _, error = await call(keel, Context(key_id="vk_1"), messages=[{"role": "user", "content": "word " * 400}])
    assert isinstance(error, RequestOverRateLimit) and error.status == 429 and error.code == "rate_limit_exceeded"
    assert "prompt alone is about" in error.message and "can never fit" in error.message
    assert error.headers() == {"x-should-retry": "false"}  # no Retry-After: waiting does not help
    _, error = await call(keel, Context(key_id="vk_1"), max_tokens=500)
    assert isinstance(error, RequestOverRateLimit) and "lower max_tokens to at most" in error.message
    # No max_tokens: the default allowance (1024) is more than the limit, so the charge is the limit.
    _, error = await call(keel, Context(key_id="vk_1"))
    assert error is None
    await keel.close()


async def test_no_limit_configured_means_no_stage_and_no_headers() -> None:
    keel = Keel(config())
    assert keel.rate_limits is None
    assert not any(isinstance(stage, RateLimitStage) for stage in keel.pipeline.stages)
    ctx, error = await call(keel)
    assert error is None and ctx.rate_limit is None
    await keel.close()


def test_the_stage_sits_just_outside_the_budget_stage() -> None:
    keel = Keel(config({"global": {"requests_per_minute": 5}}))
    names = [type(stage).__name__ for stage in keel.pipeline.stages]
    assert names.index("RateLimitStage") + 1 == names.index("BudgetStage")
    assert names.index("Observe") < names.index("RateLimitStage")


# ---------------------------------------------------------------------------- through the gateway


async def test_every_answer_carries_the_ratelimit_headers_and_a_refusal_says_when_to_retry() -> None:
    keel = Keel(config({"global": {"requests_per_minute": 2, "tokens_per_minute": 100_000}}))
    app = create_app(keel)
    clients = []
    for body in ({"model": "sim", "messages": HELLO}, {"model": "sim", "messages": HELLO, "stream": True},
                 {"model": "sim", "messages": HELLO}):
        client = Client(orjson.dumps(body))
        await app(scope(), client.receive, client.send)
        clients.append(client)
    await keel.close()
    plain, stream, refused = (client.headers() for client in clients)
    assert plain[b"x-ratelimit-limit-requests"] == b"2" and plain[b"x-ratelimit-remaining-requests"] == b"1"
    assert plain[b"x-ratelimit-limit-tokens"] == b"100000"
    assert plain[b"x-ratelimit-reset-requests"].endswith(b"s")
    assert stream[b"content-type"].startswith(b"text/event-stream")
    assert stream[b"x-ratelimit-remaining-requests"] == b"0"
    assert clients[2].status() == 429
    assert refused[b"x-ratelimit-remaining-requests"] == b"0"
    assert int(refused[b"retry-after"]) >= 1 and refused[b"x-should-retry"] == b"true"
    body = orjson.loads(clients[2].body())["error"]
    assert body["code"] == "rate_limit_exceeded" and body["type"] == "rate_limit_error"


async def test_an_answer_with_no_limit_configured_has_no_ratelimit_headers() -> None:
    keel = Keel(config())
    client = Client(orjson.dumps({"model": "sim", "messages": HELLO}))
    await create_app(keel)(scope(), client.receive, client.send)
    await keel.close()
    assert client.status() == 200
    assert not [name for name in client.headers() if name.startswith(b"x-ratelimit")]


async def test_a_rate_limited_call_is_logged_once_and_recorded_as_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keel = Keel(config({"global": {"requests_per_minute": 1}}))
    app = create_app(keel)
    for _ in range(2):
        client = Client(orjson.dumps({"model": "sim", "messages": HELLO}))
        await app(scope(), client.receive, client.send)
    await keel.close()
    refusals = [r for r in caplog.records if "rate_limit_exceeded" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    outcomes = [record["outcome"] for record in keel.writer.store.records(since=0)]
    assert sorted(outcomes) == ["ok", "rate_limited"]


# ---------------------------------------------------------------------------- the store failing


class Flaky(MemoryRateLimitBackend):
    """A memory backend that fails while `down`, as Redis does when it is unreachable."""

    shared = True

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.tries = 0

    async def hit(self, limit: Limit, cost: int) -> bool:
        self.tries += 1
        if self.down:
            raise ConnectionError("Connection refused")
        return await super().hit(limit, cost)


def limiter_on(backend: Flaky, on_error: str, retry_s: float = 0.0) -> RateLimiter:
    rules = RateRules.from_config(config({"global": {"requests_per_minute": 100}}))
    return RateLimiter(rules, backend, on_backend_error=on_error, backend_retry_s=retry_s)  # type: ignore[arg-type]


async def charge(limiter: RateLimiter) -> Any:
    return await limiter.charge(limiter.rules.for_call("sim", None, None), 0, 0, RateLimitState())


async def test_fail_open_lets_calls_through_uncounted_and_logs_the_outage_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = Flaky()
    limiter = limiter_on(backend, "fail_open")
    assert await charge(limiter) is not None
    backend.down = True
    for _ in range(5):
        assert await charge(limiter) is None
    backend.down = False
    assert await charge(limiter) is not None
    outage = [r for r in caplog.records if r.name == "keel.limits"]
    assert [r.levelno for r in outage] == [logging.ERROR, logging.WARNING]  # it started; it ended
    assert "let through uncounted" in outage[0].getMessage() and "5 calls" in outage[1].getMessage()
    metrics = {m.name: m for m in limiter.collect()}
    assert metrics["keel_rate_limit_backend_errors"].samples[0].labels == {"action": "fail_open"}
    assert metrics["keel_rate_limit_backend_errors"].samples[0].value == 5
    assert metrics["keel_rate_limit_backend_up"].samples[0].value == 1


async def test_fail_closed_refuses_with_503_and_skips_the_store_for_a_while() -> None:
    backend = Flaky()
    limiter = limiter_on(backend, "fail_closed", retry_s=60)
    backend.down = True
    for _ in range(3):
        with pytest.raises(RateLimitStoreUnavailable) as caught:
            await charge(limiter)
    assert caught.value.status == 503 and caught.value.headers()["retry-after"] == "60"
    assert backend.tries == 1  # the first failure; the next calls did not wait on a dead store
    assert {m.name: m for m in limiter.collect()}["keel_rate_limit_backend_up"].samples[0].value == 0


async def test_the_metrics_endpoint_counts_refusals_by_scope_and_kind() -> None:
    keel = Keel(config({"per_model": {"requests_per_minute": 1}}))
    for _ in range(3):
        await call(keel)
    text = keel.metrics.render()[0].decode()
    await keel.close()
    assert 'keel_rate_limited_total{kind="requests",scope="model"} 2.0' in text
    assert "keel_rate_limit_backend_up 1.0" in text


async def test_a_request_that_can_never_fit_gets_one_clear_429_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keel = Keel(config({"global": {"tokens_per_minute": 1000}}))
    client = Client(orjson.dumps({"model": "sim", "messages": [{"role": "user", "content": "many words " * 1000}]}))
    await create_app(keel)(scope(), client.receive, client.send)
    await keel.close()
    assert client.status() == 429
    assert client.headers()[b"x-should-retry"] == b"false" and b"retry-after" not in client.headers()
    error = orjson.loads(client.body())["error"]
    assert error["code"] == "rate_limit_exceeded" and "can never fit" in error["message"]
    assert "many words" not in error["message"]  # the message names sizes, never the content
    lines = [r for r in caplog.records if r.name == "keel.gateway" and "rate_limit_exceeded" in r.getMessage()]
    assert len(lines) == 1
    assert [r["outcome"] for r in keel.writer.store.records(since=0)] == ["rate_limited"]
    text = keel.metrics.render()[0].decode()
    assert 'keel_rate_limited_total{kind="tokens",scope="global"} 1.0' in text
