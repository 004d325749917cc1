"""The PII and secrets scanner: each pattern type and secret is found, ordinary text is left alone,
results never overlap (an SSN is not also a phone number), recall on the vendored labelled sample,
no network, and a precise error without Presidio."""

from __future__ import annotations

import itertools
import json
import socket
import sys
from typing import Any

import pytest
from conftest import DATA

pytest.importorskip("presidio_analyzer", reason="needs the guardrails extra: pip install 'keel[guardrails]'")

from keel.guardrails.pii import (
    PATTERN_ENTITIES,
    GuardrailsNotInstalled,
    PiiScanner,
)
from keel.guardrails.secrets import SECRET_TYPES

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
    "-----END RSA PRIVATE KEY-----"
)


@pytest.fixture(scope="module")
def scanner() -> PiiScanner:
    return PiiScanner()


def found(scanner: PiiScanner, text: str) -> list[tuple[str, str]]:
    return [(e.type, text[e.start:e.end]) for e in scanner.scan(text)]


@pytest.mark.parametrize(("text", "type_", "value"), [
    ("write to jane.doe+news@example.co.uk today", "EMAIL_ADDRESS", "jane.doe+news@example.co.uk"),
    ("card 4111 1111 1111 1111 exp 12/28", "CREDIT_CARD", "4111 1111 1111 1111"),
    ("mastercard 2223003122003222 please", "CREDIT_CARD", "2223003122003222"),  # 2-series: Presidio misses it
    ("my iban is gb42nawi04454264788619", "IBAN_CODE", "gb42nawi04454264788619"),  # lower case
    ("IBAN DE89 3704 0044 0532 0130 00 for rent", "IBAN_CODE", "DE89 3704 0044 0532 0130 00"),
    ("Here's my SSN: 460-89-9847", "US_SSN", "460-89-9847"),
    ("the server at 192.168.10.24 is down", "IP_ADDRESS", "192.168.10.24"),
    ("ping 2001:db8:85a3::8a2e:370:7334 now", "IP_ADDRESS", "2001:db8:85a3::8a2e:370:7334"),
    ("see https://www.example.com/account?id=7 for it", "URL", "https://www.example.com/account?id=7"),
    ("They're not answering at 780-999-2181", "PHONE_NUMBER", "780-999-2181"),
    ("Desk: +41 (0)96 471 07 95", "PHONE_NUMBER", "+41 (0)96 471 07 95"),
    ("Fax: 345-899-3560x4587", "PHONE_NUMBER", "345-899-3560x4587"),
    ("call me on +447700 921 916 tonight", "PHONE_NUMBER", "+447700 921 916"),
    ("Phone: 0490 75 40 81", "PHONE_NUMBER", "0490 75 40 81"),
    ("Can someone call me on 450 0840?", "PHONE_NUMBER", "450 0840"),
    ("Mobile: 03.93.92.16.85", "PHONE_NUMBER", "03.93.92.16.85"),
    ("my key is sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz012345 ok", "API_KEY", "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz012345"),
    ("AWS key AKIAIOSFODNN7EXAMPLE in the env", "API_KEY", "AKIAIOSFODNN7EXAMPLE"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "API_KEY", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "API_KEY",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("Authorization: Bearer 0123456789abcdefXYZ", "AUTH_TOKEN", "0123456789abcdefXYZ"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abcdefghij end", "AUTH_TOKEN",
     "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abcdefghij"),
    (f"key:\n{PEM}\nthanks", "PRIVATE_KEY", PEM),
    ("db postgresql://app:s3cr3t-pw@db.internal:5432/prod ok", "CONNECTION_STRING",
     "postgresql://app:s3cr3t-pw@db.internal:5432/prod"),
    ("Server=tcp:x.database.windows.net;Database=app;User ID=sa;Password=Hunter2!x;", "CONNECTION_STRING",
     "Server=tcp:x.database.windows.net;Database=app;User ID=sa;Password=Hunter2!x;"),
    ('config: {"password": "correct-horse-battery"}', "PASSWORD", "correct-horse-battery"),
    ("my password is Tr0ub4dor&3 so", "PASSWORD", "Tr0ub4dor&3"),
])
def test_each_type_is_found(scanner: PiiScanner, text: str, type_: str, value: str) -> None:
    assert (type_, value) in found(scanner, text)


def test_an_unterminated_private_key_is_a_key_to_the_end_of_the_text(scanner: PiiScanner) -> None:
    text = "here: " + PEM[:80]
    assert found(scanner, text) == [("PRIVATE_KEY", PEM[:80])]


@pytest.mark.parametrize("text", [
    "pip install scikit-learn; the sk-learn alias is short",
    "order 4111 1111 1111 1112 is on its way",  # fails the Luhn check
    "the year 2024 and the number 1234567890",  # ten digits, nothing says phone
    "Our offices are located at 6556 106 Rue Ettat",  # a street address next to "offices"
    "The meeting is on 2000-04-16 11:34:35 in room 4",
    "reply to me at the office",
    "a@b is not an address",
    "my password is short",  # no value after it
])
def test_ordinary_text_is_left_alone(scanner: PiiScanner, text: str) -> None:
    assert found(scanner, text) == []


def test_results_are_sorted_and_never_overlap(scanner: PiiScanner) -> None:
    text = ("SSN 460-89-9847, ip 106.31.73.20, mail UtaKortig@jourrapide.com, "
            "url http://user:pw12345@example.com/x, card 4111-1111-1111-1111, phone 905-674-3793")
    entities = scanner.scan(text)
    assert [(e.type, text[e.start:e.end]) for e in entities] == [
        ("US_SSN", "460-89-9847"), ("IP_ADDRESS", "106.31.73.20"), ("EMAIL_ADDRESS", "UtaKortig@jourrapide.com"),
        ("CONNECTION_STRING", "http://user:pw12345@example.com/x,"), ("CREDIT_CARD", "4111-1111-1111-1111"),
        ("PHONE_NUMBER", "905-674-3793"),
    ]
    assert all(a.end <= b.start for a, b in itertools.pairwise(entities))
    assert all(e.score >= 0.4 for e in entities)


def test_types_can_be_chosen(scanner: PiiScanner) -> None:
    assert scanner.entity_types == PATTERN_ENTITIES | SECRET_TYPES
    text = "mail jane@example.com or call 780-999-2181 with sk-AbCdEfGhIjKlMnOpQrStUvWx"
    assert found(PiiScanner({"EMAIL_ADDRESS"}), text) == [("EMAIL_ADDRESS", "jane@example.com")]
    no_secrets = PiiScanner(secrets=False)
    assert no_secrets.entity_types == PATTERN_ENTITIES
    assert [t for t, _ in found(no_secrets, text)] == ["EMAIL_ADDRESS", "PHONE_NUMBER"]
    only_email = PiiScanner({"API_KEY", "EMAIL_ADDRESS"}, secrets=False)
    assert found(only_email, text) == [("EMAIL_ADDRESS", "jane@example.com")]
    assert found(PiiScanner(set()), text) == []


def test_a_type_needing_an_ner_model_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"PERSON need an NER model"):
        PiiScanner({"PERSON", "EMAIL_ADDRESS"})


def test_a_higher_threshold_drops_weak_phone_matches() -> None:
    text = "Phone: 0490 75 40 81, desk +1-984-182-0190"
    assert found(PiiScanner({"PHONE_NUMBER"}, score_threshold=0.5), text) == [("PHONE_NUMBER", "+1-984-182-0190")]


def test_recall_on_the_labelled_sample_is_at_least_95_percent_per_pattern_type(scanner: PiiScanner) -> None:
    names = {"DOMAIN_NAME": "URL"}
    labelled: dict[str, int] = {}
    recalled: dict[str, int] = {}
    for line in (DATA / "pii-sample.jsonl").read_text(encoding="utf-8").splitlines():
        row: dict[str, Any] = json.loads(line)
        entities = scanner.scan(row["text"])
        for span in row["spans"]:
            type_ = names.get(span["type"], span["type"])
            if type_ not in PATTERN_ENTITIES:
                continue
            labelled[type_] = labelled.get(type_, 0) + 1
            recalled[type_] = recalled.get(type_, 0) + any(
                e.type == type_ and e.start < span["end"] and span["start"] < e.end for e in entities)
    assert set(labelled) >= {"CREDIT_CARD", "EMAIL_ADDRESS", "PHONE_NUMBER", "IBAN_CODE", "US_SSN"}
    recall = {t: recalled[t] / labelled[t] for t in labelled}
    assert all(r >= 0.95 for r in recall.values()), recall


def test_no_network_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scanner tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert found(PiiScanner(), "mail MilenaRossi@rhyta.com") == [("EMAIL_ADDRESS", "MilenaRossi@rhyta.com")]


def test_without_presidio_the_error_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import presidio_analyzer...` raise ImportError, as on a machine without it.
    for name in [n for n in sys.modules if n == "presidio_analyzer" or n.startswith("presidio_analyzer.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)
    with pytest.raises(GuardrailsNotInstalled) as caught:
        PiiScanner()
    assert "pip install 'keel[guardrails]'" in caught.value.message
    assert caught.value.status == 503
