"""Acceptance: prompt templates through a real `keel serve` with the official openai SDK: named by the
x-keel-prompt header or metadata.prompt, variables in `variables`, refusals as OpenAI errors, and the
prompt and version of each call in the request log and `keel report`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest
from conftest import GatewayProcess
from observability_helpers import read_records, stop_and_flush, store_section

KEY = "sk-keel-prompts-e2e-90b1"
PROMPTS = """
- name: greet
  version: 1
  model: sim
  messages: [{role: user, content: "Say hello to {{ name }}."}]
- name: greet
  version: 2
  model: sim
  messages: [{role: user, content: "Greet {{ name }} warmly."}]
"""


def test_prompts_are_rendered_refused_and_recorded(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "greet.yaml").write_text(PROMPTS)
    url = f"sqlite:///{tmp_path}/log.db"
    config = {"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
              "prompts": {"dir": str(tmp_path / "prompts")}, "store": store_section(url, tmp_path)}
    gw = GatewayProcess(config, tmp_path, env={"KEEL_MASTER_KEY": KEY}).start()
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        by_header = client.chat.completions.create(
            model="sim", messages=[], extra_headers={"x-keel-prompt": "greet@1"},
            extra_body={"variables": {"name": "Ann"}})
        assert by_header.choices[0].message.content == "echo: Say hello to Ann."
        latest = client.chat.completions.create(  # no version: the latest
            model="sim", messages=[{"role": "user", "content": "Thanks!"}], metadata={"prompt": "greet"},
            extra_body={"variables": {"name": "Bo"}})
        assert latest.choices[0].message.content == "echo: Thanks!"  # the caller's own message comes last
        with pytest.raises(openai.BadRequestError) as missing:
            client.chat.completions.create(model="sim", messages=[], extra_headers={"x-keel-prompt": "greet"})
        assert missing.value.code == "missing_variable" and "name" in str(missing.value.message)
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model="sim", messages=[], extra_headers={"x-keel-prompt": "greet@7"},
                                           extra_body={"variables": {"name": "Cy"}})
        assert unknown.value.code == "prompt_not_found" and "its versions: 1, 2" in str(unknown.value.message)
    finally:
        stop_and_flush(gw)
    records = sorted(read_records(url), key=lambda r: r["started_at"])
    assert [(r["prompt"], r["prompt_version"], r["outcome"]) for r in records] == [
        ("greet", "1", "ok"), ("greet", "2", "ok"), (None, None, "invalid"), (None, None, "invalid")]
    report = subprocess.run([sys.executable, "-m", "keel.cli", "report", "--config", str(gw.config_path),
                             "--format", "markdown"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert report.returncode in (0, 1), report.stderr
    assert "greet@1" in report.stdout and "greet@2" in report.stdout
