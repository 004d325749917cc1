"""A new user's first hour, scripted (issue 8): a fresh `git clone` of the committed repository into a
temporary folder outside this checkout, installed by its Makefile as the README says, then what the
README has them do next:

- `make run` on a free port, and the openai SDK at its default settings against it (plain and
  streamed, model `local`), and the README's example client with its address from --url or KEEL_URL;
- `keel chat` and `keel report` in a shell that activated the clone's venv;
- `make run CONFIG=examples/keel.yaml` starts with nothing else running, its log free of errors;
- a model whose upstream is dead fails the SDK's call fast (no retries on top of Keel's own);
- the tests that read tests/data pass from the clone (the data is in the repository).

Selected alone with `pytest -m newcomer`. `make install` in the clone reuses pip's cache (the
llama-cpp-python wheel built by the first install), about a minute; the whole module takes a few.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import free_port, require_service

pytestmark = [pytest.mark.newcomer, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "Say hello."}]
# The SDK's default is two retries with backoff; a dead upstream took ~27 s to fail before Keel told
# the SDK not to retry. A bound this wide only separates "fails fast" from "retries on top".
FAST_FAILURE_S = 15


def newcomer_env() -> dict[str, str]:
    """The environment of a fresh shell: this checkout's venv off PATH, no Keel or Python settings."""
    own_bin = os.path.abspath(os.path.dirname(sys.executable))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if os.path.abspath(p) != own_bin)
    return env


def shell(clone: Path, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A command as the README writes it, in the clone, after `source .venv/bin/activate`."""
    return subprocess.run(
        ["bash", "-c", f"source .venv/bin/activate && {command}"],
        cwd=clone, env=newcomer_env(), capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (ROOT / ".git").exists():
        require_service("a git checkout", f"{ROOT} has no .git: there is nothing to clone")
    folder = tmp_path_factory.mktemp("newcomer") / "keel"
    assert not folder.resolve().is_relative_to(ROOT), "the clone must live outside the checkout"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(folder)], check=True, timeout=120)
    started = time.monotonic()
    install = subprocess.run(["make", "install"], cwd=folder, env=newcomer_env(),
                             capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    print(f"\nmake install in a fresh clone: {time.monotonic() - started:.0f} s")
    return folder


class MakeRun:
    """`make run HOST=127.0.0.1 PORT=<free>` (and any other variables) in the clone, in a process
    group of its own so that stopping it stops the gateway that make started."""

    def __init__(self, clone: Path, *variables: str, ready_path: str = "/readyz") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = clone / f"make-run-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["make", "run", "HOST=127.0.0.1", f"PORT={self.port}", *variables],
                cwd=clone, env=newcomer_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._wait_until_answered(ready_path, timeout=300)

    def _wait_until_answered(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"make run exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling a server that is starting: nothing to wait on but its port
        self.stop()
        raise AssertionError(f"make run did not answer {path} within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def served(clone: Path) -> Iterator[MakeRun]:
    gateway = MakeRun(clone)
    yield gateway
    gateway.stop()


def sdk(gateway: MakeRun) -> openai.OpenAI:
    """The official client as a README reader writes it: default retries and timeouts."""
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused")


def test_make_install_gives_a_keel_command_in_the_venv(clone: Path) -> None:
    assert (clone / ".venv" / "bin" / "keel").exists()
    assert "Usage" in shell(clone, "keel --help").stdout


def test_make_run_answers_the_openai_sdk_plainly_and_streamed(served: MakeRun) -> None:
    client = sdk(served)
    reply = client.chat.completions.create(model="local", messages=HELLO, max_tokens=16)
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(model="local", messages=HELLO, max_tokens=16, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert "source .venv/bin/activate" in served.log()  # make run says how to put keel on PATH


def test_the_example_client_takes_its_address_from_url_or_keel_url(clone: Path, served: MakeRun) -> None:
    # The example needs only the openai package: this interpreter has it (the README says pip install openai).
    example = [sys.executable, "examples/openai_client.py"]
    by_flag = subprocess.run([*example, "local", "--url", served.url + "/v1"], cwd=clone, env=newcomer_env(),
                             capture_output=True, text=True, timeout=300)
    assert by_flag.returncode == 0 and by_flag.stdout.strip(), by_flag.stderr[-2000:]
    by_env = subprocess.run(example, cwd=clone, env={**newcomer_env(), "KEEL_URL": served.url + "/v1"},
                            capture_output=True, text=True, timeout=300)
    assert by_env.returncode == 0 and by_env.stdout.strip(), by_env.stderr[-2000:]


def test_keel_chat_and_keel_report_run_in_the_activated_venv(clone: Path) -> None:
    chat = shell(clone, 'keel chat "hello" --model sim --config examples/simulated.yaml')
    assert (chat.returncode, chat.stdout.strip()) == (0, "echo: hello"), chat.stderr
    local = shell(clone, 'keel chat "Write a haiku about boats." --stream --max-tokens 16')
    assert local.returncode == 0 and local.stdout.strip(), local.stderr[-2000:]

    report = shell(clone, "keel report --since 1h --format json")
    assert report.returncode == 0, report.stderr
    by_model = {row["model"]: row for row in json.loads(report.stdout)["by_model"]}
    assert by_model["sim"]["requests"] >= 1 and by_model["local"]["requests"] >= 1


def test_the_reference_config_starts_as_is_and_logs_no_error(clone: Path) -> None:
    gateway = MakeRun(clone, "CONFIG=examples/keel.yaml")
    try:
        reply = sdk(gateway).chat.completions.create(model="sim", messages=HELLO)
        assert reply.choices[0].message.content == "echo: Say hello."
    finally:
        gateway.stop()
    log = gateway.log()
    assert "No module named" not in log and "Traceback" not in log
    assert [line for line in log.splitlines() if " ERROR " in line or line.startswith("ERROR")] == []


def test_a_dead_upstream_fails_the_sdk_fast(clone: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config = clone / "dead-upstream.yaml"
    config.write_text(
        "models:\n  - name: dead\n    deployments:\n"
        f"      - {{provider: openai, base_url: {dead}, model: gpt-4o-mini}}\n"
    )
    gateway = MakeRun(clone, f"CONFIG={config.name}", ready_path="/healthz")
    try:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as failure:
            sdk(gateway).chat.completions.create(model="dead", messages=HELLO)
        elapsed = time.monotonic() - started
    finally:
        gateway.stop()
    assert failure.value.status_code >= 500
    assert elapsed < FAST_FAILURE_S, f"the SDK took {elapsed:.1f} s to give up on a dead upstream"


def test_the_tests_that_read_tests_data_pass_from_the_clone(clone: Path) -> None:
    """OpenAI's spec and the recorded streams come with the repository (they once lived outside it)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/e2e/test_replay.py", "tests/integration/test_anthropic_provider.py"],
        cwd=clone, env={**os.environ, "PYTHONPATH": str(clone / "src")},  # the clone's keel, this venv's tools
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout and "FileNotFoundError" not in result.stdout
