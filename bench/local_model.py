"""The embedded model through the gateway against llama-cpp-python called directly.

    .venv/bin/python bench/local_model.py [--runs 10] [--tokens 64] [--threads N]

`keel serve` runs in a child process with one `local` deployment (SmolLM2-135M-Instruct);
this process loads the same GGUF file with `llama_cpp.Llama` and calls it directly. Both get
the same prompts, seed and settings (temperature 0, max_tokens fixed), plain and streamed,
and the calls are interleaved (the order flips every run) so a noisy machine hurts both
alike. Both start every call from an empty KV cache, as the provider does for seeded
determinism. Reported per mode: generated tokens per second of the whole call (prompt
evaluation included; median, and p10: the slow tail), p90 of the call's latency, median
time to the first token for streams, and the ratio of the gateway's median tokens/s to the
direct one's (target: at least 95%).

A figure, not a test: the machine's load moves these numbers; compare within one run.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from keel.config import LocalDeployment
from keel.providers.local import default_threads, model_file

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain how a bicycle works, step by step, in detail.",
    "Describe a walk through a busy market in a small town.",
    "Write a letter to a friend about a trip to the mountains.",
    "Tell me about the history of lighthouses and the people who kept them.",
]
SEED = 1234


@dataclass
class Sample:
    seconds: float
    tokens: int
    first_token_s: float | None = None

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    def median_rate(self) -> float:
        return statistics.median(s.rate for s in self.samples)

    def p10_rate(self) -> float:
        return quantile([s.rate for s in self.samples], 0.1)

    def p90_latency(self) -> float:
        return quantile([s.seconds for s in self.samples], 0.9)

    def median_first_token(self) -> float | None:
        firsts = [s.first_token_s for s in self.samples if s.first_token_s is not None]
        return statistics.median(firsts) if firsts else None


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- the gateway


def start_gateway(tmp: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {"models": [{"name": "local", "timeout_s": 600, "deployments": [
        {"provider": "local", "n_threads": threads}]}]}
    path = tmp / "bench-local.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel.cli", "serve", "--config", str(path), "--port", str(port),
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "KEEL_MASTER_KEY": ""},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("keel serve exited early; run it by hand to see why")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit("keel serve did not become ready within 60 s")


def gateway_body(prompt: str, tokens: int, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": "local", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens, "temperature": 0, "seed": SEED, "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def gateway_plain(client: httpx.Client, prompt: str, tokens: int) -> Sample:
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", content=gateway_body(prompt, tokens, False))
    response.raise_for_status()
    usage = orjson.loads(response.content)["usage"]
    return Sample(time.perf_counter() - started, usage["completion_tokens"])


def gateway_stream(client: httpx.Client, prompt: str, tokens: int) -> Sample:
    started = time.perf_counter()
    first: float | None = None
    generated = 0
    with client.stream("POST", "/v1/chat/completions", content=gateway_body(prompt, tokens, True)) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
    return Sample(time.perf_counter() - started, generated, first)


# ---------------------------------------------------------------------------- llama-cpp-python, directly


def load_direct(threads: int) -> Any:
    from llama_cpp import Llama

    path = model_file(LocalDeployment(provider="local"))
    return Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)


def direct_plain(llm: Any, prompt: str, tokens: int) -> Sample:
    started = time.perf_counter()
    llm.reset()
    result = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0, top_p=1.0, seed=SEED
    )
    return Sample(time.perf_counter() - started, result["usage"]["completion_tokens"])


def direct_stream(llm: Any, prompt: str, tokens: int) -> Sample:
    started = time.perf_counter()
    first: float | None = None
    generated = 0
    llm.reset()
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0, top_p=1.0, seed=SEED,
        stream=True,
    ):
        if chunk["choices"][0]["delta"].get("content"):
            generated += 1  # one piece per token for these English answers
            if first is None:
                first = time.perf_counter() - started
    return Sample(time.perf_counter() - started, generated, first)


# ---------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> None:
    threads = args.threads or default_threads()
    proc, url = start_gateway(Path(tempfile.mkdtemp(prefix="keel-bench-local-")), threads)
    llm = load_direct(threads)
    series = {key: Series() for key in ("gateway plain", "direct plain", "gateway stream", "direct stream")}
    try:
        with httpx.Client(base_url=url, timeout=600, headers={"content-type": "application/json"}) as client:
            calls: dict[str, Callable[[str, int], Sample]] = {
                "gateway plain": lambda p, n: gateway_plain(client, p, n),
                "direct plain": lambda p, n: direct_plain(llm, p, n),
                "gateway stream": lambda p, n: gateway_stream(client, p, n),
                "direct stream": lambda p, n: direct_stream(llm, p, n),
            }
            for call in calls.values():  # warm both paths, not counted
                call(PROMPTS[0], 8)
            for run_index in range(args.runs):
                prompt = PROMPTS[run_index % len(PROMPTS)]
                order = list(calls) if run_index % 2 == 0 else list(reversed(calls))
                for name in order:
                    series[name].samples.append(calls[name](prompt, args.tokens))
                print(f"  run {run_index + 1}/{args.runs} done", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(15)
    report(series, args, threads)


def report(series: dict[str, Series], args: argparse.Namespace, threads: int) -> None:
    print(f"\nembedded model, {args.runs} runs x {args.tokens} tokens, temperature 0, seed {SEED}, "
          f"{threads} thread(s), {os.cpu_count()} CPU(s)\n")
    print("tok/s: generated tokens / whole-call seconds, prompt evaluation included\n")
    print(f"{'path':<16} {'tok/s median':>12} {'tok/s p10':>10} {'latency p90':>12} {'first token':>12} {'tokens':>7}")
    for name, s in series.items():
        first = s.median_first_token()
        shown = f"{first * 1000:.0f} ms" if first is not None else "-"
        tokens = statistics.median(x.tokens for x in s.samples)
        print(f"{name:<16} {s.median_rate():>12.1f} {s.p10_rate():>10.1f} {s.p90_latency():>10.2f} s "
              f"{shown:>12} {tokens:>7.0f}")
    print()
    for mode in ("plain", "stream"):
        ratio = series[f"gateway {mode}"].median_rate() / series[f"direct {mode}"].median_rate()
        verdict = "meets" if ratio >= 0.95 else "misses"
        print(f"gateway/direct, {mode:<6}: {ratio:6.1%}  ({verdict} the 95% target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads; default: as the provider")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
