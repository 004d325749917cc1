"""The request log's default redactions: API keys, card numbers and emails never reach the store in
plain text, ordinary text is left alone, and user patterns add to the defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA

from keel.config import StoreConfig, parse_config
from keel.observability.redaction import builtin_redactions, luhn_valid, redaction_patterns
from keel.observability.writer import REDACTED, ContentPolicy

SAMPLE = DATA / "pii-sample.jsonl"


def redact(text: str) -> str:
    for redaction in builtin_redactions():
        text = redaction.sub(REDACTED, text)
    return text


@pytest.mark.parametrize(("text", "secret"), [
    ("my key is sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz012345 ok", "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz012345"),
    ("anthropic: sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123", "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc"),
    ("authorization: bearer 0123456789abcdefXYZ", "0123456789abcdefXYZ"),
    ("AWS key AKIAIOSFODNN7EXAMPLE in the env", "AKIAIOSFODNN7EXAMPLE"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("pay with 4111 1111 1111 1111 please", "4111 1111 1111 1111"),
    ("pay with 4111-1111-1111-1111 please", "4111-1111-1111-1111"),
    ("amex 378282246310005.", "378282246310005"),
    ("card 5555555555554444 exp 12 28", "5555555555554444"),
    ("card 4111 1111 1111 1111 12 28 cvc 123", "4111 1111 1111 1111"),  # the expiry runs on: still found
    ("write to jane.doe+news@example.co.uk today", "jane.doe+news@example.co.uk"),
])
def test_a_builtin_secret_is_redacted(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert REDACTED in redacted


@pytest.mark.parametrize("text", [
    "pip install scikit-learn; the sk-learn alias is short",  # too short to be a key
    "order 4111 1111 1111 1112 is on its way",  # 16 digits failing the Luhn check
    "call +1 415 555 2671 or 020 7946 0958",
    "id 41111111111111111111111111",  # 28 digits in one group: an id, not a card
    "the year 2024 and the number 1234567890",
    "reply to me at the office",
    "a@b is not an address",
])
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_two_cards_in_one_run_are_both_redacted() -> None:
    assert redact("4111111111111111 5555555555554444") == f"{REDACTED} {REDACTED}"


def test_luhn_check() -> None:
    assert luhn_valid("4111 1111 1111 1111") and luhn_valid("79927398713")
    assert not luhn_valid("4111 1111 1111 1112") and not luhn_valid("79927398710")


def labelled() -> list[dict[str, Any]]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


def test_every_labelled_card_and_email_is_redacted() -> None:
    """Presidio's synthetic sentences (tests/data/pii-sample.md): every card number of 13 to 19
    digits and every email address is gone; 12-digit cards are out of the documented range."""
    found = 0
    for line in labelled():
        redacted = redact(line["text"])
        for span in line["spans"]:
            digits = sum(c.isdigit() for c in span["value"])
            if span["type"] == "EMAIL_ADDRESS" or (span["type"] == "CREDIT_CARD" and 13 <= digits <= 19):
                assert span["value"] not in redacted, line["text"]
                found += 1
    assert found >= 150  # the sample holds what it says


def test_labelled_sentences_without_cards_or_emails_are_left_alone() -> None:
    """Phone numbers, IBANs, SSNs, dates, zip codes and addresses are not taken for cards."""
    others = [line for line in labelled()
              if not {span["type"] for span in line["spans"]} & {"CREDIT_CARD", "EMAIL_ADDRESS"}]
    assert len(others) == 150
    assert [line["text"] for line in others if redact(line["text"]) != line["text"]] == []


# ---------------------------------------------------------------------------- the store's policy


def test_the_default_store_config_never_keeps_a_card_number() -> None:
    policy = ContentPolicy(StoreConfig())
    kept = policy.apply([{"role": "user", "content": "card 4111 1111 1111 1111, mail me at a.b@example.com"}])
    assert kept == [{"role": "user", "content": f"card {REDACTED}, mail me at {REDACTED}"}]


def test_user_patterns_add_to_the_builtin_ones() -> None:
    policy = ContentPolicy(StoreConfig(redact=[r"\b\d{3}-\d{2}-\d{4}\b"]))
    assert policy.apply("SSN 123-45-6789, key sk-abcdefghijklmnopqrstuvwx") == f"SSN {REDACTED}, key {REDACTED}"


def test_the_builtin_redactions_can_be_switched_off() -> None:
    config = parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
                           "store": {"redact_defaults": False, "redact": ["secret"]}})
    policy = ContentPolicy(config.store)
    assert policy.apply("card 4111 1111 1111 1111 secret") == f"card 4111 1111 1111 1111 {REDACTED}"


def test_a_bad_user_pattern_is_named_with_its_index() -> None:
    with pytest.raises(ValueError, match=r"store.redact\[1\] is not a valid regular expression"):
        redaction_patterns(["ok", "(unclosed"])


def test_the_sample_data_is_vendored_with_its_source_and_licence() -> None:
    notes = (DATA / "pii-sample.md").read_text()
    assert "presidio-research" in notes and "MIT" in notes
    assert Path(DATA / "pii-sample.LICENSE").read_text().strip().startswith("MIT License")
