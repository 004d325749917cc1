"""Prompt templates: loading and its errors, strict sandboxed rendering, versions and A/B splits, and a
prompt named in the library and in a request, recorded in the request log."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import RecordingSink

from keel.config import ConfigError, TracingConfig, parse_config
from keel.engine import Keel
from keel.errors import InvalidRequest
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing
from keel.prompts import (
    MissingVariable,
    PromptFileInvalid,
    PromptNotFound,
    PromptRegistry,
    PromptTemplate,
    apply_prompt,
)
from keel.prompts.registry import version_order
from keel.prompts.template import PromptRenderFailed

SUMMARISE_V1 = """
name: summarise
version: 1
model: sim
messages:
  - {role: system, content: "You summarise {{ kind }} in {{ words }} words."}
  - {role: user, content: "{{ text }}"}
"""
SUMMARISE_V2 = """
name: summarise
version: 2
model: sim
response_format: {type: json_object}
messages:
  - {role: system, content: "Summarise the {{ kind }} as JSON."}
  - {role: user, content: "{{ text }}"}
"""
GREET = """
- name: greet
  version: "2024-06-01"
  messages: [{role: user, content: "Hello {{ name | upper }}!"}]
- name: greet
  version: "2024-11-01"
  messages: [{role: user, content: "Hi {{ name }}."}]
"""


@pytest.fixture
def prompt_dir(tmp_path: Path) -> Path:
    root = tmp_path / "prompts"
    (root / "nested").mkdir(parents=True)
    (root / "summarise-v1.yaml").write_text(SUMMARISE_V1)
    (root / "nested" / "summarise-v2.yml").write_text(SUMMARISE_V2)
    (root / "greet.yaml").write_text(GREET)
    (root / "notes.txt").write_text("not a prompt")
    return root


def test_a_directory_loads_every_prompt_and_the_latest_version_is_the_natural_order(prompt_dir: Path) -> None:
    registry = PromptRegistry.load(prompt_dir)
    assert {name: sorted(v) for name, v in registry.versions.items()} == {
        "summarise": ["1", "2"], "greet": ["2024-06-01", "2024-11-01"]}
    assert registry.get("summarise").version == "2"
    assert registry.get("greet").version == "2024-11-01"
    assert sorted(["10", "9", "v1.10", "v1.9"], key=version_order) == ["9", "10", "v1.9", "v1.10"]


def test_rendering_fills_variables_as_they_are_and_names_every_missing_one(prompt_dir: Path) -> None:
    template = PromptRegistry.load(prompt_dir).get("summarise", "1")
    assert template.variables == {"kind", "words", "text"}
    assert template.render({"kind": "news", "words": 20, "text": "<b>R&D</b> grew"}) == [
        {"role": "system", "content": "You summarise news in 20 words."},
        {"role": "user", "content": "<b>R&D</b> grew"},  # not escaped: prompts are not HTML
    ]
    with pytest.raises(MissingVariable) as missing:
        template.render({"kind": "news"})
    assert missing.value.status == 400 and missing.value.param == "variables.text"
    assert "text, words" in missing.value.message


def test_a_variable_with_a_default_may_be_left_out() -> None:
    template = PromptTemplate.of({"name": "x", "version": 1, "messages": [
        {"role": "user", "content": "{{ kind | default('text') }}: {{ a }} {{ b }}"}]}, "inline")
    assert template.render({"a": 1, "b": 2}) == [{"role": "user", "content": "text: 1 2"}]
    with pytest.raises(MissingVariable) as missing:
        template.render({})
    assert "a, b" in missing.value.message and "kind" not in missing.value.message


def test_the_sandbox_refuses_reaching_python_objects() -> None:
    template = PromptTemplate.of({"name": "x", "version": 1, "messages": [
        {"role": "user", "content": "{{ text.__class__.__mro__[1].__subclasses__() }}"}]}, "inline")
    with pytest.raises(PromptRenderFailed) as refused:
        template.render({"text": "hi"})
    assert refused.value.status == 400


@pytest.mark.parametrize(("entry", "words"), [
    ({"version": 1, "messages": [{"role": "user", "content": "x"}]}, "needs a `name`"),
    ({"name": "a", "messages": [{"role": "user", "content": "x"}]}, "needs a `version`"),
    ({"name": "a", "version": 1, "messages": []}, "at least one"),
    ({"name": "a", "version": 1, "messages": [{"role": "robot", "content": "x"}]}, "messages[0] must be"),
    ({"name": "a", "version": 1, "messages": [{"role": "user", "content": "{{ oops"}]}, "not a valid template"),
    ({"name": "a", "version": 1, "messages": [{"role": "user", "content": "x"}], "temprature": 0}, "temprature"),
])
def test_a_bad_prompt_file_is_refused_with_where_and_what(entry: dict[str, Any], words: str) -> None:
    with pytest.raises(PromptFileInvalid) as refused:
        PromptTemplate.of(entry, "prompts/a.yaml")
    assert "prompts/a.yaml" in str(refused.value) and words in str(refused.value)


def test_one_version_defined_twice_with_other_text_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SUMMARISE_V1)
    (tmp_path / "b.yaml").write_text(SUMMARISE_V1.replace("summarise {{ kind }}", "shorten {{ kind }}"))
    with pytest.raises(PromptFileInvalid, match="defined twice"):
        PromptRegistry.load(tmp_path)
    (tmp_path / "b.yaml").write_text(SUMMARISE_V1)  # the same content twice is harmless
    assert PromptRegistry.load(tmp_path).get("summarise").version == "1"


def test_unknown_prompts_and_versions_are_404s_that_list_what_exists(prompt_dir: Path) -> None:
    registry = PromptRegistry.load(prompt_dir)
    with pytest.raises(PromptNotFound) as no_prompt:
        registry.get("translate")
    assert no_prompt.value.status == 404 and "greet, summarise" in no_prompt.value.message
    with pytest.raises(PromptNotFound) as no_version:
        registry.get("summarise", "3")
    assert "its versions: 1, 2" in no_version.value.message and no_version.value.param == "prompt_version"


def test_a_split_gives_each_version_its_share_and_each_caller_one_version(prompt_dir: Path) -> None:
    registry = PromptRegistry.load(prompt_dir, {"summarise": {"1": 90, "2": 10}})
    picks = Counter(registry.get("summarise", caller=f"user-{i}").version for i in range(20_000))
    assert picks["1"] / 20_000 == pytest.approx(0.9, abs=0.01)
    assert {registry.get("summarise", caller="user-7").version for _ in range(50)} == {
        registry.get("summarise", caller="user-7").version}
    assert registry.get("summarise", "2", caller="user-7").version == "2"  # a named version beats the split
    with pytest.raises(PromptFileInvalid, match="version\\(s\\) 3"):
        PromptRegistry.load(prompt_dir, {"summarise": {"1": 50, "3": 50}})


def test_apply_renders_the_named_prompt_and_keeps_the_callers_own_messages(prompt_dir: Path) -> None:
    registry = PromptRegistry.load(prompt_dir)
    params: dict[str, Any] = {"metadata": {"prompt": "summarise", "prompt_version": "2", "feature": "news"},
                              "variables": {"kind": "report", "text": "Sales rose."},
                              "messages": [{"role": "user", "content": "Keep it short."}]}
    ref = apply_prompt(params, registry)
    assert ref is not None and (ref.name, ref.version) == ("summarise", "2")
    assert "variables" not in params  # never sent upstream
    assert params["model"] == "sim" and params["response_format"] == {"type": "json_object"}
    assert [m["content"] for m in params["messages"]] == [
        "Summarise the report as JSON.", "Sales rose.", "Keep it short."]
    by_header: dict[str, Any] = {"model": "other", "variables": {"name": "ann"}}
    ref = apply_prompt(by_header, registry, header="greet@2024-06-01")
    assert ref is not None and ref.version == "2024-06-01"
    assert by_header["model"] == "other" and by_header["messages"] == [{"role": "user", "content": "Hello ANN!"}]
    assert apply_prompt({"model": "m", "messages": []}, registry) is None
    with pytest.raises(InvalidRequest, match="names no prompt"):
        apply_prompt({"model": "m", "variables": {"a": 1}}, registry)
    with pytest.raises(InvalidRequest, match="names no model"):
        apply_prompt({"variables": {"name": "x"}, "prompt": "greet"}, registry)
    with pytest.raises(PromptNotFound, match="no prompts"):
        apply_prompt({"prompt": "greet"}, None)


def library(prompt_dir: Path, **prompts: Any) -> tuple[Keel, RecordingSink]:
    config = parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
                           "prompts": {"dir": str(prompt_dir), **prompts}})
    sink = RecordingSink()
    return Keel(config, stages=[Observe(sink, Tracing(TracingConfig(to_store=False)), Metrics())]), sink


async def test_the_library_renders_a_prompt_and_the_log_records_its_version(prompt_dir: Path) -> None:
    keel, sink = library(prompt_dir)
    try:
        answer = await keel.chat(prompt="summarise", prompt_version="1",
                                 variables={"kind": "news", "words": 5, "text": "Rain today."})
        assert "Rain today." in (answer.choices[0].message.content or "")  # the simulator echoes the user
        record = sink.only()
        assert (record.prompt, record.prompt_version, record.model) == ("summarise", "1", "sim")
        with pytest.raises(MissingVariable):
            await keel.chat(prompt="summarise", variables={"kind": "news"})
    finally:
        await keel.close()


def test_a_bad_prompts_directory_stops_keel_with_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        library(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"needs prompts\.dir"):
        parse_config({"models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
                      "prompts": {"splits": {"a": {"1": 1}}}})
