"""Property: whatever a keel.yaml holds, loading it gives a config or a ConfigError (whose message
says where and what), never another exception."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.config import ConfigError, KeelConfig, load_config, parse_config

SCALAR = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
          | st.sampled_from(["simulated", "openai", "anthropic", "local", "sim", "http://x", "redis://h:1/0",
                             "postgresql://u:p@h/db", "sqlite:///k.db", "1s", "-1", "${NOPE}", "memory", "redis"]))
# Keys Keel knows (so the fuzz goes deep, past the first unknown-key refusal), and some it does not.
KEY = st.sampled_from([
    "models", "name", "deployments", "provider", "model", "base_url", "api_key_env", "api_key", "weight",
    "server", "host", "port", "max_body_bytes", "store", "url", "retention_days", "spool_dir", "cache",
    "exact", "semantic", "backend", "ttl_s", "guardrails", "input", "output", "injection", "pii", "limits",
    "rate_limits", "budgets", "auth", "master_key_env", "retry", "max_attempts", "breaker", "timeout_s",
    "fallbacks", "price", "input_per_mtok", "output_per_mtok", "router", "tiers", "state", "redis_url",
    "tracing", "slo", "alerts", "latency_ms", "template", "enabled", "mode", "rpm", "tpm",
]) | st.text(max_size=8)
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=4),
                     max_leaves=25)
DEPLOYMENT = st.fixed_dictionaries({"provider": st.sampled_from(["simulated", "openai", "anthropic", "nope"])},
                                   optional={"model": SCALAR, "base_url": SCALAR, "api_key_env": SCALAR,
                                             "timeout_s": SCALAR, "weight": SCALAR, "extra": VALUE})
MODEL = st.fixed_dictionaries({"name": SCALAR}, optional={"deployments": st.lists(DEPLOYMENT, max_size=2) | VALUE,
                                                          "fallbacks": VALUE, "price": VALUE})
CONFIG = st.fixed_dictionaries({"models": st.lists(MODEL, max_size=2) | VALUE},
                               optional={k: VALUE for k in ("server", "store", "cache", "guardrails", "limits",
                                                            "budgets", "auth", "retry", "state", "router")})


def config_or_error(data: Any) -> None:
    try:
        config = parse_config(data, warn_unset_keys=False)
    except ConfigError as exc:
        assert str(exc).strip(), "a ConfigError must say what is wrong"
    else:
        assert isinstance(config, KeelConfig)


@settings(max_examples=120, derandomize=True, deadline=None)
@given(CONFIG | VALUE)
def test_any_mapping_is_a_config_or_a_config_error(data: Any) -> None:
    config_or_error(data)


@settings(max_examples=50, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | CONFIG.map(lambda c: yaml.safe_dump(c, allow_unicode=True)) | st.binary(max_size=60))
def test_any_file_is_a_config_or_a_config_error(tmp_path: Path, text: str | bytes) -> None:
    path = tmp_path / "keel.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path, warn_unset_keys=False)
    except ConfigError as exc:
        assert str(exc).strip()
