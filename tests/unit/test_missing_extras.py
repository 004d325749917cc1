"""A config that names a service whose Python client is not installed stops with the command that
installs it, not with Python's "No module named ..."."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from keel.cli import app

REDIS_CONFIG = {
    "models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
    "state": {"redis_url": "redis://127.0.0.1:6379/0"},
}


@pytest.fixture
def without_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import redis...` raise ImportError, as on a machine without it.
    for name in [name for name in sys.modules if name == "redis" or name.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)


def test_a_redis_url_without_the_redis_package_names_the_install_command(
    without_redis: None, tmp_path: Path
) -> None:
    config = tmp_path / "keel.yaml"
    config.write_text(yaml.safe_dump(REDIS_CONFIG))
    result = CliRunner().invoke(app, ["chat", "hello", "--model", "sim", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "state.redis_url is set but the redis package is not installed" in result.output
    assert "pip install 'keel[redis]'" in result.output
    assert "No module named" not in result.output


def test_a_redis_rate_limit_backend_without_the_redis_package_names_the_install_command(
    without_redis: None, tmp_path: Path
) -> None:
    config = tmp_path / "keel.yaml"
    config.write_text(yaml.safe_dump({
        "models": REDIS_CONFIG["models"],
        "limits": {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0", "global": {"requests_per_minute": 5}},
    }))
    result = CliRunner().invoke(app, ["chat", "hello", "--model", "sim", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "limits.backend is redis but the redis package is not installed" in result.output
    assert "pip install 'keel[redis]'" in result.output
