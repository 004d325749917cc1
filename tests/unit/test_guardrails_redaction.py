"""Reversible redaction within a call: placeholders out, values back; the same value keeps its
placeholder; placeholders found again in an answer (whole, or starting at its end)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keel.guardrails.pii import Entity
from keel.guardrails.redaction import PLACEHOLDER, Redactor


def spans(text: str, *pairs: tuple[str, str]) -> list[Entity]:
    out = []
    for type_, value in pairs:
        start = text.index(value)
        out.append(Entity(type_, start, start + len(value), 1.0))
    return out


def test_values_become_numbered_placeholders_and_come_back() -> None:
    redactor = Redactor()
    text = "mail jane@example.com and bob@example.org, call 780-999-2181"
    redacted = redactor.redact(text, spans(text, ("EMAIL_ADDRESS", "jane@example.com"),
                                           ("EMAIL_ADDRESS", "bob@example.org"), ("PHONE_NUMBER", "780-999-2181")))
    assert redacted == "mail <EMAIL_ADDRESS_1> and <EMAIL_ADDRESS_2>, call <PHONE_NUMBER_1>"
    assert redactor.count == 3
    assert redactor.restore(redacted) == text
    answer = "I wrote to <EMAIL_ADDRESS_2> and will call <PHONE_NUMBER_1>."
    assert redactor.restore(answer) == "I wrote to bob@example.org and will call 780-999-2181."


def test_the_same_value_keeps_its_placeholder_across_texts_of_one_call() -> None:
    redactor = Redactor()
    first = "from jane@example.com"
    second = "again jane@example.com, then ann@example.com"
    assert redactor.redact(first, spans(first, ("EMAIL_ADDRESS", "jane@example.com"))) == "from <EMAIL_ADDRESS_1>"
    assert redactor.redact(second, spans(second, ("EMAIL_ADDRESS", "jane@example.com"),
                                         ("EMAIL_ADDRESS", "ann@example.com"))) == (
        "again <EMAIL_ADDRESS_1>, then <EMAIL_ADDRESS_2>")
    assert redactor.count == 2
    # Another call has its own numbering and values.
    other = Redactor()
    assert other.restore("<EMAIL_ADDRESS_1>") == "<EMAIL_ADDRESS_1>"


def test_a_placeholder_already_in_the_text_is_not_reused_and_unknown_ones_stay() -> None:
    redactor = Redactor()
    text = "the literal <EMAIL_ADDRESS_1> and jane@example.com"
    redacted = redactor.redact(text, spans(text, ("EMAIL_ADDRESS", "jane@example.com")))
    assert redacted == "the literal <EMAIL_ADDRESS_1> and <EMAIL_ADDRESS_2>"
    assert redactor.restore(redacted) == text
    assert redactor.restore("<API_KEY_9> <EMAIL_ADDRESS_2>") == "<API_KEY_9> jane@example.com"


def test_overlapping_or_empty_entities_are_skipped() -> None:
    redactor = Redactor()
    text = "key sk-abc and more"
    entities = [Entity("API_KEY", 4, 10, 1.0), Entity("URL", 6, 12, 0.5), Entity("URL", 14, 14, 0.5)]
    assert redactor.redact(text, entities) == "key <API_KEY_1> and more"
    assert redactor.redact(text, []) == text


def test_find_placeholders_whole_and_a_start_at_the_end() -> None:
    redactor = Redactor()
    text = "a jane@example.com b 4111111111111111"
    redactor.redact(text, spans(text, ("EMAIL_ADDRESS", "jane@example.com"), ("CREDIT_CARD", "4111111111111111")))
    answer = "Sure, <EMAIL_ADDRESS_1> owns <CREDIT_CARD_1>; <URL_1> is not ours; <CREDIT_C"
    found = redactor.find_placeholders(answer)
    assert [(e.type, answer[e.start:e.end]) for e in found] == [
        (PLACEHOLDER, "<EMAIL_ADDRESS_1>"), (PLACEHOLDER, "<CREDIT_CARD_1>"), (PLACEHOLDER, "<CREDIT_C")]
    assert redactor.find_placeholders("nothing <here") == []
    assert Redactor().find_placeholders("<EMAIL_ADDRESS_1>") == []


def test_the_repr_shows_no_value() -> None:
    redactor = Redactor()
    text = "secret jane@example.com"
    redactor.redact(text, spans(text, ("EMAIL_ADDRESS", "jane@example.com")))
    assert "jane" not in repr(redactor)


@given(st.lists(st.text(alphabet="ab@.xyz 1<>", min_size=1, max_size=12), min_size=1, max_size=6), st.data())
def test_redact_then_restore_is_the_identity(values: list[str], data: st.DataObject) -> None:
    fillers = data.draw(st.lists(st.text(alphabet="qrs ,", max_size=5), min_size=len(values) + 1,
                                 max_size=len(values) + 1))
    text, entities, position = "", [], 0
    for filler, value in zip(fillers, values, strict=False):
        text += filler
        position = len(text)
        text += value
        entities.append(Entity("EMAIL_ADDRESS", position, position + len(value), 1.0))
    text += fillers[-1]
    redactor = Redactor()
    redacted = redactor.redact(text, entities)
    assert redactor.restore(redacted) == text
    assert redactor.count == len(set(values))
