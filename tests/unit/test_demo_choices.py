"""`keel demo`'s choices before it sends anything: the gateway's root from what the user typed, and the
chat model from what the gateway serves."""

from __future__ import annotations

import pytest

from keel.demo.run import DemoError, DemoSettings, _chat_model


@pytest.mark.parametrize("typed", ["http://h:8080", "http://h:8080/", "http://h:8080/v1", "http://h:8080/v1/"])
def test_the_root_drops_a_trailing_slash_and_v1(typed: str) -> None:
    assert DemoSettings(base_url=typed).root == "http://h:8080"


def test_the_demo_model_is_chosen_when_served() -> None:
    assert _chat_model(None, ["local", "local-embed", "demo", "demo-fallback"]) == "demo"


def test_without_it_the_first_chat_model_that_is_not_an_embedder_or_the_fallback_model() -> None:
    assert _chat_model(None, ["local-embed", "demo-fallback", "sim", "local"]) == "sim"


def test_an_asked_model_must_be_served_and_the_error_lists_what_is() -> None:
    assert _chat_model("local", ["demo", "local"]) == "local"
    with pytest.raises(DemoError, match="serves no model 'gpt'; it serves demo, local"):
        _chat_model("gpt", ["demo", "local"])


def test_a_gateway_with_only_embedders_is_said_plainly() -> None:
    with pytest.raises(DemoError, match="no chat model"):
        _chat_model(None, ["local-embed"])
