"""The `keel` command as a user runs it: a real process, its exit code, its stdout and stderr."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import GatewayProcess, free_port

KEEL = Path(sys.executable).with_name("keel")
SIM_DEPLOYMENT = {"provider": "simulated"}
SIM_CONFIG: dict[str, Any] = {
    "models": [{"name": "sim", "deployments": [{"provider": "simulated", "latency_ms": 5, "error_rate": 0.0}]}],
}


def keel_command() -> list[str]:
    """The installed console script when there is one, else the module."""
    return [str(KEEL)] if KEEL.exists() else [sys.executable, "-m", "keel.cli"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "KEEL_CONFIG"}
    return subprocess.run(
        [*keel_command(), *args], capture_output=True, text=True, timeout=timeout, env={**environment, **(env or {})},
        cwd=cwd,
    )


def write_config(tmp_path: Path, config: dict[str, Any] | str, name: str = "keel.yaml") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------- a bad config stops start-up


def test_serve_with_a_bad_config_exits_fast_naming_the_key(tmp_path: Path) -> None:
    bad = write_config(tmp_path, "models:\n  - name: chat\n    timeout_sec: 30\n"
                                 "    deployments: [{provider: simulated}]\n", "bad.yaml")
    started = time.monotonic()
    result = run("serve", "--config", str(bad), "--port", str(free_port()), timeout=30)
    elapsed = time.monotonic() - started

    assert result.returncode != 0
    assert elapsed < 15
    assert "models[0].timeout_sec: unknown key 'timeout_sec'; did you mean 'timeout_s'?" in result.stderr
    assert str(bad) in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_an_unknown_provider_lists_the_valid_ones(tmp_path: Path) -> None:
    bad = write_config(tmp_path, {"models": [{"name": "chat", "deployments": [{"provider": "openia"}]}]})
    result = run("serve", "--config", str(bad), timeout=30)
    assert result.returncode != 0
    assert "models[0].deployments[0].provider: unknown provider 'openia'" in result.stderr
    assert "openai, anthropic, local, simulated" in result.stderr


def test_serve_with_a_missing_config_file_says_so(tmp_path: Path) -> None:
    result = run("serve", "--config", str(tmp_path / "missing.yaml"), timeout=30)
    assert result.returncode != 0
    assert "cannot read config file" in result.stderr and "missing.yaml" in result.stderr


def test_serve_reads_a_bad_config_named_by_keel_config(tmp_path: Path) -> None:
    config = {"models": [{"name": "chat", "timeout_s": -1, "deployments": [{"provider": "simulated"}]}]}
    bad = write_config(tmp_path, config)
    result = run("serve", env={"KEEL_CONFIG": str(bad)}, timeout=30)
    assert result.returncode != 0
    assert "models[0].timeout_s: should be greater than 0, got -1" in result.stderr


def test_serve_starts_and_only_warns_about_an_unset_key_variable(
    gateway: Callable[..., GatewayProcess],
) -> None:
    config = {"models": [
        {"name": "sim", "deployments": [{"provider": "simulated"}]},
        {"name": "up", "deployments": [{"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                                        "api_key_env": "KEEL_TEST_UNSET_VARIABLE"}]},
    ]}
    gw = gateway(config, env={"KEEL_TEST_UNSET_VARIABLE": ""})
    reply = httpx.post(gw.url + "/v1/chat/completions",
                       json={"model": "sim", "messages": [{"role": "user", "content": "hello"}]}, timeout=10)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "echo: hello"
    assert "KEEL_TEST_UNSET_VARIABLE is not set" in gw.log()
    assert "WARNING" in gw.log()
    assert f"serving sim, up at http://127.0.0.1:{gw.port}/v1; request log: sqlite:///" in gw.log()


def test_a_logged_database_url_never_shows_its_password() -> None:
    from keel.probes import safe_url

    assert safe_url("postgresql://keel:s3cret@db:5432/keel") == "postgresql://keel:***@db:5432/keel"
    assert safe_url("sqlite:///keel.db") == "sqlite:///keel.db"


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    result = run("--version", timeout=30)
    assert result.returncode == 0
    assert result.stdout == f"keel {version('keel')}\n"


def test_serve_reads_keel_yaml_in_the_working_directory_and_says_so(tmp_path: Path) -> None:
    """And starts quietly: no Alembic INFO lines, no lock file left beside the new database."""
    write_config(tmp_path, {**SIM_CONFIG, "store": {"url": "sqlite:///log/keel.db"}})
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "KEEL_CONFIG"}
    proc = subprocess.Popen([*keel_command(), "serve", "--port", str(port)], cwd=tmp_path, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # uvicorn says this once the lifespan (migrations included) is done
            lines.append(line)
            if "Application startup complete" in line:
                break
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                           json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    finally:
        proc.terminate()
        proc.wait(15)
    output = "".join(lines)
    assert reply.status_code == 200, output
    assert f"serving sim at http://127.0.0.1:{port}/v1; request log: sqlite:///log/keel.db; " \
           f"config: {tmp_path / 'keel.yaml'} (./keel.yaml in the working directory)" in output
    assert "alembic" not in output.lower()
    assert (tmp_path / "log" / "keel.db").exists()
    assert list(tmp_path.rglob("*.migrate-lock")) == []


def test_with_no_config_file_anywhere_the_embedded_model_is_served(tmp_path: Path) -> None:
    # An unknown model is refused before the embedded model is loaded: quick, and shows what is served.
    result = run("chat", "--model", "nope", "hi", cwd=tmp_path, timeout=30)
    assert result.returncode == 1
    assert "Models served here: local, local-embed." in result.stderr


# ---------------------------------------------------------------------------- keel check


def test_check_reports_each_backend_and_upstream_and_exits_1_on_a_failure(tmp_path: Path) -> None:
    from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

    with FakeOpenAIServer(FakeBehaviour(model="gpt-4o-mini")) as upstream:
        config = {
            "models": [
                {"name": "up", "deployments": [
                    {"provider": "openai", "base_url": upstream.url, "model": "gpt-4o-mini"},
                    {"provider": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "m",
                     "name": "dead", "api_key_env": "KEEL_TEST_UNSET_VARIABLE"},
                ]},
                {"name": "sim", "deployments": [{"provider": "simulated"}]},
            ],
            "store": {"url": f"sqlite:///{tmp_path}/new/keel.db"},
        }
        result = run("check", str(write_config(tmp_path, config)), "--timeout", "5",
                     env={"COLUMNS": "250", "KEEL_TEST_UNSET_VARIABLE": ""})
    rows = table_rows(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "OK" in rows["config"] and "valid: 2 models, 3 deployments" in rows["config"]
    assert "OK" in rows["request log"] and "does not exist yet" in rows["request log"]
    assert "OK" in rows["model 'up' → openai/gpt-4o-mini"] and "'gpt-4o-mini' is listed" in rows[
        "model 'up' → openai/gpt-4o-mini"]
    assert "FAIL" in rows["model 'up' → dead"] and "Connection refused" in rows["model 'up' → dead"]
    assert "KEEL_TEST_UNSET_VARIABLE is not set" in rows["model 'up' → dead"]
    assert "OK" in rows["model 'sim' → simulated/simulated"]
    assert "1 check failed" in result.stderr
    assert "WARNING" not in result.stderr  # the unset key is said in its row, not as a log warning
    assert not (tmp_path / "new").exists()  # nothing created


def table_rows(text: str) -> dict[str, str]:
    """A rich table's rows by their first cell, each row's wrapped lines joined."""
    rows: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) < 2:
            continue
        if cells[0]:
            last = cells[0]
            rows[last] = ""
        rows[last] += " ".join(cells[1:]) + " "
    return rows


def test_check_passes_when_everything_answers(tmp_path: Path) -> None:
    config = {**SIM_CONFIG, "store": {"url": f"sqlite:///{tmp_path}/keel.db"}}
    result = run("check", str(write_config(tmp_path, config)), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and result.stdout.count("OK") == 3


def test_check_of_a_bad_config_exits_1_naming_the_key(tmp_path: Path) -> None:
    bad = write_config(tmp_path, {"models": [{"name": "m", "timeout_s": "30", "deployments": [SIM_DEPLOYMENT]}]})
    result = run("check", str(bad))
    assert result.returncode == 1
    assert "models[0].timeout_s: should be a valid number, got '30'" in result.stderr


# ---------------------------------------------------------------------------- redaction by default


def test_a_card_number_never_reaches_the_log_in_plain_text(tmp_path: Path) -> None:
    from keel.observability.store import RecordStore

    url = f"sqlite:///{tmp_path}/keel.db"
    config = {**SIM_CONFIG, "store": {"url": url}}
    result = run("chat", "my card is 4111 1111 1111 1111, mail a.b@example.com", "--config",
                 str(write_config(tmp_path, config)))
    assert result.returncode == 0, result.stderr
    store = RecordStore(url)
    try:
        [record] = store.records(since=0)
    finally:
        store.close()
    assert record["input"] == [{"role": "user", "content": "my card is [REDACTED], mail [REDACTED]"}]
    assert "4111" not in str(record["output"]) and "example.com" not in str(record["output"])


# ---------------------------------------------------------------------------- keel chat


def test_chat_prints_the_answer(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, SIM_CONFIG, "cfg.yaml")
    result = run("chat", "hello", "--model", "sim", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: hello\n"


def test_chat_stream_prints_the_same_text(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, SIM_CONFIG, "cfg.yaml")
    result = run("chat", "hello there", "--model", "sim", "--stream", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: hello there\n"


def test_chat_uses_the_first_model_and_keel_config_by_default(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, SIM_CONFIG)
    result = run("chat", "hello", env={"KEEL_CONFIG": str(cfg)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: hello\n"


def test_chat_with_an_unknown_model_names_the_models_served(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, SIM_CONFIG)
    result = run("chat", "hello", "--model", "gpt-5", "--config", str(cfg))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "error: (model_not_found) The model 'gpt-5' does not exist. Models served here: sim." in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_reports_an_upstream_failure_without_a_traceback(tmp_path: Path) -> None:
    config = {"models": [{"name": "broken", "retry": {"max_attempts": 2, "initial_backoff_ms": 1},
                          "deployments": [{"provider": "simulated", "error_rate": 1.0}]}]}
    result = run("chat", "hello", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 1
    assert "error: (upstream_server_error)" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_refuses_a_bad_template_at_start_up(tmp_path: Path) -> None:
    config = {"models": [{"name": "sim", "deployments": [{"provider": "simulated", "template": "hi {name}"}]}]}
    result = run("chat", "hello", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 2
    assert "models[0].deployments[0].template: unknown placeholder {name}" in result.stderr


# ---------------------------------------------------------------------------- keel fake-upstream


class FakeUpstreamProcess:
    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*keel_command(), "fake-upstream", "--port", str(self.port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}/v1"
        # It says where it listens once it does: wait for that line (EOF: it exited).
        seen: list[str] = []
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            seen.append(raw.decode(errors="replace"))
            if "listening on" in seen[-1]:
                self.started_line = seen[-1].strip()
                return
        self.stop()
        raise RuntimeError("keel fake-upstream exited early:\n" + "".join(seen))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def fake_upstream_process() -> Iterator[Callable[..., FakeUpstreamProcess]]:
    started: list[FakeUpstreamProcess] = []

    def start(*flags: str) -> FakeUpstreamProcess:
        process = FakeUpstreamProcess(*flags)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def chat_body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def test_fake_upstream_starts_and_answers_like_openai(
    fake_upstream_process: Callable[..., FakeUpstreamProcess],
) -> None:
    fake = fake_upstream_process()
    reply = httpx.post(fake.url + "/chat/completions", json=chat_body("ping"), timeout=10)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "echo: ping"
    models = httpx.get(fake.url + "/models", timeout=10).json()
    assert models["object"] == "list"


def test_fake_upstream_fails_on_purpose(fake_upstream_process: Callable[..., FakeUpstreamProcess]) -> None:
    fake = fake_upstream_process("--fail-rate", "1", "--fail-status", "429", "--retry-after", "2")
    reply = httpx.post(fake.url + "/chat/completions", json=chat_body(), timeout=10)
    assert reply.status_code == 429
    assert reply.headers["retry-after"] == "2"
    assert "error" in reply.json()


def test_keel_survives_a_flaky_fake_upstream(
    tmp_path: Path, fake_upstream_process: Callable[..., FakeUpstreamProcess]
) -> None:
    fake = fake_upstream_process("--fail-rate", "0.5", "--fail-status", "503", "--seed", "3")
    config = {"models": [{"name": "up", "retry": {"max_attempts": 10, "initial_backoff_ms": 1, "max_backoff_ms": 5},
                          "deployments": [{"provider": "openai", "base_url": fake.url, "model": "gpt-4o-mini"}]}]}
    cfg = write_config(tmp_path, config)
    for _ in range(3):
        result = run("chat", "hello", "--config", str(cfg))
        assert result.returncode == 0, result.stderr
        assert result.stdout == "echo: hello\n"
    stats = httpx.get(fake.url.removesuffix("/v1") + "/_fake/stats", timeout=10).json()
    assert stats["failures"] > 0  # the retries did real work


def test_fake_upstream_help_lists_its_own_flags() -> None:
    result = run("fake-upstream", "--help", env={"COLUMNS": "200"}, timeout=30)
    assert result.returncode == 0
    assert "keel fake-upstream" in result.stdout
    for flag in ("--port", "--fail-rate", "--fail-status", "--retry-after", "--hang", "--cut-after", "--seed"):
        assert flag in result.stdout


def test_fake_upstream_help_gives_every_flag_a_sentence_and_its_default() -> None:
    from dataclasses import fields

    from keel.testing.fake_openai import FLAG_HELP, FakeBehaviour

    assert set(FLAG_HELP) == {f.name for f in fields(FakeBehaviour)}
    result = run("fake-upstream", "--help", env={"COLUMNS": "300"}, timeout=30)
    options = result.stdout.split("options:")[1].split("\n\n")[0]
    entries: list[str] = []  # one per flag: its line and the help lines under it
    for line in options.splitlines():
        if line.strip().startswith("-"):
            entries.append(line.strip())
        elif entries:
            entries[-1] += " " + line.strip()
    flags = [entry for entry in entries if not entry.startswith("-h")]
    assert len(flags) == len(FLAG_HELP) + 2  # and --host, --port
    for entry in flags:
        sentence = re.sub(r"^--[\w-]+( [A-Z_]+)?\s+", "", entry)  # the flag and its metavar
        assert "(default: " in sentence, entry
        assert len(sentence.split("(default: ")[0].strip()) > 10, entry
    assert "--port PORT" in options and "(default: 9100)" in options


def test_fake_upstream_says_where_it_listens(fake_upstream_process: Callable[..., FakeUpstreamProcess]) -> None:
    fake = fake_upstream_process()
    assert fake.started_line == f"fake OpenAI upstream listening on {fake.url} (Ctrl-C stops it)"


def test_fake_upstream_refuses_an_unknown_flag() -> None:
    result = run("fake-upstream", "--fail-ratio", "1", timeout=30)
    assert result.returncode != 0
    assert "--fail-ratio" in result.stderr


def test_a_stream_cut_after_its_first_chunk_ends_with_an_error(tmp_path: Path) -> None:
    config = {"models": [{"name": "cut", "deployments": [{"provider": "simulated", "errors": {"cut": 1.0}}]}]}
    result = run("chat", "one two three four", "--stream", "--config", str(write_config(tmp_path, config)))
    assert result.returncode == 1
    assert result.stdout == "echo: one \n"  # what reached the client before the cut, never retried
    assert "error: (upstream_connection_error)" in result.stderr


# ---------------------------------------------------------------------------- the documented examples


@pytest.mark.parametrize(("script", "expected"), [
    ("library_async.py", "echo: hello\necho: hello again\n"),
    ("library_sync.py", "echo: stream me\n404 model_not_found\n"),
    ("custom_stage.py", "refused: 400 invalid_request Please do not shout."),
    ("answering_stages.py", "pong\nECHO: HI"),
])
def test_the_documented_examples_run(script: str, expected: str) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    result = subprocess.run([sys.executable, str(examples / script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_the_openai_client_example_runs_against_keel_serve(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(SIM_CONFIG)
    script = Path(__file__).resolve().parents[2] / "examples" / "openai_client.py"
    result = subprocess.run(
        [sys.executable, str(script), "sim"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "KEEL_URL": gw.url + "/v1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "echo: Say hello.\necho: Count to 5.\n"


def test_serve_with_a_missing_local_model_file_stops_before_starting(tmp_path: Path) -> None:
    missing = str(tmp_path / "no.gguf")
    config = {"models": [{"name": "l", "deployments": [{"provider": "local", "model_path": missing}]}]}
    result = run("serve", "--config", str(write_config(tmp_path, config)), "--port", str(free_port()), timeout=30)
    assert result.returncode == 2
    assert "models[0].deployments[0] (provider: local)" in result.stderr
    assert "no.gguf does not exist" in result.stderr
    assert "Traceback" not in result.stderr
