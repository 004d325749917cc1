"""Drift: the statistics against known values, the verdicts (and their minimum sample size), the
upstream and canary checks, and alerts that fire once per onset."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web

from keel.config import AlertsConfig
from keel.evals.drift import (
    DriftAlert,
    DriftAlertSender,
    OnsetTracker,
    Thresholds,
    compare_calls,
    is_refusal,
    kolmogorov_q,
    ks_2samp,
    psi,
    render_json,
    render_markdown,
    send_onsets,
    two_proportions,
)

WINDOW, BASELINE = (1000.0, 2000.0), (0.0, 1000.0)


def call(**fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": "chat", "deployment": "sim", "feature": None, "outcome": "ok", "completion_tokens": 20,
        "latency_ms": 100.0, "cost_usd": 0.001, "upstream_model": "gpt-x", "system_fingerprint": "fp_1",
        "output": None, "metadata": None,
    }
    row.update(fields)
    return row


def calls(n: int, seed: int, *, tokens: float = 20, latency: float = 100, error_every: int = 0,
          **fields: Any) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        call(completion_tokens=int(rng.normal(tokens, 3)), latency_ms=float(rng.lognormal(math.log(latency), 0.2)),
             outcome="error" if error_every and i % error_every == 0 else "ok", **fields)
        for i in range(n)
    ]


def verdicts(baseline: list[dict[str, Any]], window: list[dict[str, Any]], **limits: Any) -> dict[str, str]:
    report = compare_calls(baseline, window, window=WINDOW, baseline=BASELINE, thresholds=Thresholds(**limits))
    return {row.metric: row.verdict for row in report.rows if row.deployment == "*"}


# ---------------------------------------------------------------------------- statistics


def test_ks_matches_a_hand_computed_example() -> None:
    # CDFs at 1..7: a 1/4, 2/4, 3/4, 1, 1, 1, 1; b 0, 0, 1/5, 2/5, 3/5, 4/5, 1: the largest gap is at 4.
    d, p = ks_2samp([1, 2, 3, 4], [3, 4, 5, 6, 7])
    assert d == pytest.approx(0.6)
    n = 4 * 5 / 9
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * 0.6
    by_hand = 2 * (math.exp(-2 * lam**2) - math.exp(-8 * lam**2) + math.exp(-18 * lam**2))
    assert p == pytest.approx(by_hand, rel=1e-6)
    assert p == pytest.approx(0.2587, abs=1e-3)


def test_kolmogorov_tail_gives_the_textbook_critical_values() -> None:
    assert kolmogorov_q(1.358) == pytest.approx(0.05, abs=5e-4)
    assert kolmogorov_q(1.628) == pytest.approx(0.01, abs=2e-4)
    assert kolmogorov_q(0.0) == 1.0


def test_ks_of_identical_samples_is_zero_and_of_disjoint_ones_is_one() -> None:
    assert ks_2samp([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)
    d, p = ks_2samp(list(range(50)), list(range(100, 150)))
    assert d == 1.0 and p < 1e-10


def test_psi_is_zero_on_identical_distributions_and_large_on_shifted_ones() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(100, 10, 2000).tolist()
    assert psi(base, base) == pytest.approx(0.0, abs=1e-12)
    assert psi(base, rng.normal(100, 10, 2000).tolist()) < 0.05  # the same distribution, a new sample
    assert 0.1 < psi(base, rng.normal(104, 10, 2000).tolist()) < 0.3  # ~0.4 sd: "watch" territory
    assert psi(base, rng.normal(130, 10, 2000).tolist()) > 2


def test_psi_of_two_bins_matches_the_formula() -> None:
    # A constant baseline has two bins (at or under 5, above); the window puts half of its values above.
    value = psi([5.0] * 10, [5.0] * 5 + [9.0] * 5)
    floor = 1e-4
    assert value == pytest.approx((0.5 - 1) * math.log(0.5 / 1) + (0.5 - floor) * math.log(0.5 / floor))


def test_two_proportions_matches_a_worked_example() -> None:
    # 10/100 against 25/100: pooled 0.175, z = 0.15 / sqrt(0.175 * 0.825 * 0.02) = 2.7915.
    assert two_proportions(10, 100, 25, 100) == pytest.approx(math.erfc(2.7915 / math.sqrt(2)), rel=1e-3)
    assert two_proportions(0, 50, 0, 50) == 1.0


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.", "I cannot assist with this request.",
    "As an AI language model, I cannot do that.", "I am sorry, I am unable to share that.",
])
def test_refusals_are_detected(text: str) -> None:
    assert is_refusal({"role": "assistant", "content": text})


@pytest.mark.parametrize("output", [
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "assistant", "content": "Sorry for the delay: here is the list."},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, None,
])
def test_ordinary_answers_are_not_refusals(output: Any) -> None:
    assert not is_refusal(output)


def test_a_message_refusal_field_is_a_refusal() -> None:
    assert is_refusal({"role": "assistant", "content": None, "refusal": "no"})


# ---------------------------------------------------------------------------- verdicts


def test_an_unshifted_window_does_not_drift() -> None:
    found = verdicts(calls(400, 1), calls(200, 2))
    assert "drift" not in found.values(), found
    assert found["output tokens"] == "ok" and found["upstream_model"] == "ok"


def test_longer_answers_slower_calls_and_more_errors_drift() -> None:
    found = verdicts(calls(400, 1, error_every=50), calls(200, 2, tokens=40, latency=300, error_every=5))
    assert found["output tokens"] == "drift"
    assert found["latency ms"] == "drift"
    assert found["error rate"] == "drift"
    assert found["cost per call"] == "ok"


def test_under_the_minimum_sample_a_metric_says_not_enough_data() -> None:
    found = verdicts(calls(400, 1), calls(29, 2, tokens=80))
    assert found["output tokens"] == "not enough data"
    assert verdicts(calls(400, 1), calls(30, 2, tokens=80))["output tokens"] == "drift"


def test_a_new_upstream_model_or_fingerprint_drifts() -> None:
    found = verdicts(calls(50, 1), calls(50, 2, upstream_model="gpt-x-2025", system_fingerprint="fp_2"))
    assert found["upstream_model"] == "drift" and found["system_fingerprint"] == "drift"
    report = compare_calls(calls(50, 1), calls(50, 2, system_fingerprint="fp_2"), window=WINDOW, baseline=BASELINE)
    row = next(r for r in report.rows if r.metric == "system_fingerprint")
    assert row.statistic == "new: fp_2" and row.baseline == "fp_1"


def test_a_value_the_baseline_had_is_no_change() -> None:
    base = calls(50, 1) + calls(5, 3, system_fingerprint="fp_0")
    assert verdicts(base, calls(50, 2, system_fingerprint="fp_0"))["system_fingerprint"] == "ok"


def test_refusal_rate_needs_content_and_drifts_when_refusals_grow() -> None:
    said = {"role": "assistant", "content": "Here you go."}
    refused = {"role": "assistant", "content": "I'm sorry, but I can't help with that."}
    base = [call(output=said) for _ in range(200)]
    window = [call(output=refused if i % 4 == 0 else said) for i in range(200)]
    assert verdicts(base, window)["refusal rate"] == "drift"
    report = compare_calls(calls(100, 1), calls(100, 2), window=WINDOW, baseline=BASELINE)
    assert "refusal rate" not in {r.metric for r in report.rows}
    assert any("log_content is off" in note for note in report.notes)


def test_own_calls_are_not_live_traffic() -> None:
    found = verdicts(calls(100, 1), calls(100, 2) + calls(100, 3, tokens=500, feature="eval:suite"))
    assert found["output tokens"] == "ok"


def test_canary_answers_that_change_drift() -> None:
    def canary(prompt: str, answer: str) -> dict[str, Any]:
        return call(feature="keel.canary", metadata={"canary": prompt},
                    output={"role": "assistant", "content": answer})

    base = [canary(p, f"answer {p}") for p in "abc" for _ in range(4)]
    same = [canary(p, f"answer {p}") for p in "abc"]
    changed = [canary(p, f"new answer {p}") for p in "ab"] + [canary("c", "answer c")]
    assert verdicts(base, same)["canary answers"] == "ok"
    assert verdicts(base, changed)["canary answers"] == "drift"
    assert verdicts(base, changed[:2])["canary answers"] == "not enough data"


def test_the_answer_centroid_uses_the_embedder() -> None:
    def embed(texts: list[str]) -> Any:  # a fake: "cats" texts along one axis, the rest along another
        return np.array([[1.0, 0.0] if "cat" in t else [0.0, 1.0] for t in texts], dtype=np.float32)

    base = [call(output={"role": "assistant", "content": "a cat"}) for _ in range(40)]
    drifted = [call(output={"role": "assistant", "content": "a dog"}) for _ in range(40)]
    for window, verdict in ((base, "ok"), (drifted, "drift")):
        report = compare_calls(base, window, window=WINDOW, baseline=BASELINE, embed=embed)
        assert next(r for r in report.rows if r.metric == "answer centroid").verdict == verdict


def test_a_model_with_several_deployments_gets_rows_per_deployment() -> None:
    base = calls(40, 1) + calls(40, 2, deployment="other")
    window = calls(40, 3) + calls(40, 4, deployment="other", tokens=60)
    report = compare_calls(base, window, window=WINDOW, baseline=BASELINE)
    rows = {(r.deployment, r.metric): r.verdict for r in report.rows}
    assert rows[("other", "output tokens")] == "drift" and rows[("sim", "output tokens")] == "ok"


def test_renderings_carry_every_row() -> None:
    report = compare_calls(calls(40, 1), calls(40, 2, tokens=60), window=WINDOW, baseline=BASELINE)
    parsed = orjson.loads(render_json(report))
    assert parsed["drift"] is True and len(parsed["rows"]) == len(report.rows)
    assert "| chat | output tokens |" in render_markdown(report) and "**drift**" in render_markdown(report)


# ---------------------------------------------------------------------------- onsets and alerts


def test_an_onset_alerts_once_and_again_only_after_recovery(tmp_path: Path) -> None:
    state = tmp_path / "drift.json"
    steady, shifted = calls(100, 1), calls(100, 2, tokens=60)

    def onsets(window: list[dict[str, Any]], tracker: OnsetTracker) -> list[str]:
        report = compare_calls(steady, window, window=WINDOW, baseline=BASELINE)
        return [row.metric for row in tracker.onsets(report, now=1.0)]

    assert onsets(shifted, OnsetTracker(state)) == ["output tokens"]
    assert onsets(shifted, OnsetTracker(state)) == []  # still drifting: the state file remembers
    assert onsets(calls(10, 3, tokens=60), OnsetTracker(state)) == []  # not enough data changes nothing
    assert onsets(calls(100, 4), OnsetTracker(state)) == []  # back to normal
    assert onsets(shifted, OnsetTracker(state)) == ["output tokens"]  # a new onset


async def test_drift_alerts_go_to_the_budget_alert_webhook(caplog: pytest.LogCaptureFixture) -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        report = compare_calls(calls(100, 1), calls(100, 2, tokens=60), window=WINDOW, baseline=BASELINE)
        sender = DriftAlertSender(AlertsConfig(webhook_url=f"http://127.0.0.1:{port}/hook"))
        await send_onsets(sender, OnsetTracker().onsets(report), at=1_700_000_000.0, timeout_s=10)
    finally:
        await runner.cleanup()
    assert [(a["kind"], a["model"], a["metric"]) for a in received] == [("drift", "chat", "output tokens")]
    assert received[0]["id"] == "drift:chat|*|output tokens:1700000000" and sender.delivered == 1
    assert "drift alert: chat output tokens drifted" in caplog.text


def test_without_a_webhook_a_drift_alert_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    report = compare_calls(calls(100, 1), calls(100, 2, tokens=60), window=WINDOW, baseline=BASELINE)
    sender = DriftAlertSender(AlertsConfig())
    sender.send_drift(DriftAlert(report.drifted[0], 0.0))
    assert "drift alert: chat output tokens drifted" in caplog.text
    assert sender.raised == {("drift", "chat", "output tokens"): 1}
    asyncio.run(sender.stop())
