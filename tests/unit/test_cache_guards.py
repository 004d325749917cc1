"""The semantic cache's guards (keel.cache.guards): each guard on its own, true paraphrases that must pass,
the hand-made near misses in tests/data/cache-near-misses.jsonl, and a measured check on MRPC."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest

from keel.cache.guards import (
    GuardVerdict,
    date_guard,
    entity_guard,
    guard,
    negation_guard,
    number_guard,
    order_guard,
)

DATA = Path(__file__).resolve().parents[1] / "data"
# A seeded sample of MRPC, in the repository (tests/data/README.md says how it was drawn).
MRPC_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "mrpc-guards-sample.tsv"

PARAPHRASES = [
    ("How do I reset my password?", "How can I reset my password?"),
    ("What's the capital of France?", "What is the capital of France?"),
    ("Don't cancel my order", "Do not cancel my order"),
    ("I can't log in to my account", "I cannot log in to my account"),
    ("I want 3 tickets", "I want three tickets"),
    ("Send 1,000 dollars", "Send 1000 dollars"),
    ("Give me a dozen names for a cat", "Give me 12 names for a cat"),
    ("A list of twenty-five fruits", "A list of 25 fruits"),
    ("What's the weather in Paris tomorrow?", "What will the weather be like in Paris tomorrow?"),
    ("How do I convert a list to a string in Python?", "How can I convert a list into a string in Python?"),
    ("Explain recursion to me", "Can you explain recursion to me?"),
    ("Tell me a joke about cats", "Tell me a cat joke"),
    ("Summarise this article", "Give me a summary of this article"),
    ("How do I sort a dictionary by value?", "How can I sort a dict by its values?"),
    ("Who wrote Hamlet?", "Who is the author of Hamlet?"),
    ("What is the boiling point of water?", "At what temperature does water boil?"),
    ("Is the museum open on Monday?", "Is the museum open on Mondays?"),
    ("How do I undo the last git commit?", "How can I undo my last git commit?"),
    ("Recommend a book about Rome", "Can you recommend a book about Rome?"),
    ("What does HTTP 404 mean?", "What is the meaning of HTTP 404?"),
    ("Why is the sky blue?", "Why's the sky blue?"),
    ("How many days are in a leap year?", "How many days does a leap year have?"),
    ("flights to paris", "Flights to Paris"),
    ("Which one is better for beginners, Python or Java?", "Which is better for beginners, Python or Java?"),
]


def _query_pairs() -> list[dict[str, object]]:
    lines = (DATA / "cache-query-pairs.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _near_misses() -> list[dict[str, str]]:
    lines = (DATA / "cache-near-misses.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# -- the verdict ------------------------------------------------------------------------------------


def test_a_verdict_is_a_small_frozen_record() -> None:
    assert guard("How do I reset my password?", "How can I reset my password?") == GuardVerdict(True, None)
    refused = guard("cancel my order", "don't cancel my order")
    assert refused == GuardVerdict(False, "negation")
    with pytest.raises(AttributeError):
        refused.ok = True  # type: ignore[misc]


# -- each guard -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("cancel my order", "don't cancel my order"),
        ("cancel my order", "do not cancel my order"),
        ("Should I take it with food?", "Should I take it without food?"),
        ("Does it work?", "Doesn't it work?"),
        ("I can swim", "I cannot swim"),
        ("Don't close the door, open the window", "Close the door, don't open the window"),
        ("Why won't my laptop turn on?", "Why won't my laptop turn off?"),
        ("Why won't my laptop turn on?", "Why won't my laptop charge?"),
        ("It isn't the battery", "It is the battery"),
    ],
)
def test_negation_refuses_a_negation_the_other_lacks(a: str, b: str) -> None:
    assert negation_guard(a, b) == "negation"
    assert negation_guard(b, a) == "negation"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("don't cancel my order", "do not cancel my order"),
        ("I can\u2019t log in", "I cannot log in"),
        ("never mind", "never mind"),
        ("reset my password", "change my password"),
        ("Why won't my laptop turn on?", "My laptop won't turn on, why?"),
        ("Why doesn't my code compile?", "My code doesn't compile, why?"),
        ("Why doesn't the printer print?", "The printer doesn't print. Why?"),
        ("Doesn't it work?", "It doesn't work?"),
    ],
)
def test_negation_lets_the_same_negation_through(a: str, b: str) -> None:
    assert negation_guard(a, b) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("2 tickets", "3 tickets"),
        ("two tickets", "three tickets"),
        ("1,000 users", "10,000 users"),
        ("a dozen eggs", "ten eggs"),
        ("2.5 million", "2.5 billion"),
        ("3 apples and 2 pears", "3 apples and 3 pears"),
        ("room for 4", "room for four or five"),
        ("the 1st item", "the 2nd item"),
    ],
)
def test_number_refuses_different_numbers(a: str, b: str) -> None:
    assert number_guard(a, b) == "number"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("3 tickets", "three tickets"),
        ("1,000 users", "1000 users"),
        ("a dozen eggs", "12 eggs"),
        ("twenty-five lines", "25 lines"),
        ("two hundred and five", "205"),
        ("2.50 dollars", "2.5 dollars"),
        ("2 and 3", "3 and 2"),
        ("which one is faster", "which is faster"),
        ("no numbers here", "none here either"),
    ],
)
def test_number_normalises_spellings(a: str, b: str) -> None:
    assert number_guard(a, b) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("weather today", "weather tomorrow"),
        ("open on Monday?", "open on Tuesday?"),
        ("in January", "in February"),
        ("the 2020 election", "the 2024 election"),
        ("what happened on 2024-05-01", "what happened on 2024-05-02"),
        ("meetings next week", "meetings last week"),
        ("flights in May to Oslo", "flights in June to Oslo"),
        ("the news yesterday", "the news"),
    ],
)
def test_date_refuses_different_dates(a: str, b: str) -> None:
    assert date_guard(a, b) == "date"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("open on monday?", "Open on Monday?"),
        ("in Jan", "in January"),
        ("May I ask a question?", "Can I ask a question?"),
        ("we march at dawn", "we walk at dawn"),
        ("what is a week", "how long is a week"),
        ("What's the weather in Berlin tomorrow?", "Tomorrow's weather in Berlin?"),
        ("Monday\u2019s meetings", "meetings on Monday"),
    ],
)
def test_date_ignores_lookalikes_and_normalises(a: str, b: str) -> None:
    assert date_guard(a, b) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Book a flight to Paris", "Book a flight to Rome"),
        ("Paris hotels near the centre", "Rome hotels near the centre"),
        ("the population of New York", "the population of York"),
        ('rename the column "price"', 'rename the column "cost"'),
        ("grep for `foo_bar`", "grep for `foo_baz`"),
        ("What did Obama say?", "What did the president say?"),
        ("Explain Newton's laws", "Explain Einstein's laws"),
        ("What is Australia's capital?", "What is Austria's capital?"),
        ("Compose a song for Alice", "Compose a song for Bob"),
    ],
)
def test_entity_refuses_different_names(a: str, b: str) -> None:
    assert entity_guard(a, b) == "entity"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("flights to paris", "Flights to Paris"),
        ("What is Python?", "what is python?"),
        ("How do I reset my password?", "How can I reset my password?"),
        ("Convert this to JSON", "Please convert this to JSON"),
        ("I think I'm lost", "I believe I am lost"),
        ("Explain it simply.", "Describe it simply."),
        ("What is the capital of Australia?", "Which city is Australia's capital?"),
        ("What is the GDP of Germany?", "How big is Germany\u2019s GDP?"),
        ("Write a haiku about the ocean.", "Compose a haiku about the sea."),
        ("What is the integral of 1/x?", "Integrate 1/x."),
        ("What is the derivative of x^2?", "Differentiate x^2."),
        ("Make this sentence formal.", "Rewrite this sentence formally."),
        ("Write an email declining the invite.", "Draft an email declining the invite."),
        ("Book a table for two", "Reserve a table for two"),
        ("Shorten this paragraph", "Please shorten this paragraph"),
        ("Unsubscribe me from the newsletter", "Remove me from the newsletter"),
        ("What helps a sore throat?", "Sorry, what helps a sore throat?"),
        ("Solve 2x + 3 = 11", "Find x if 2x + 3 = 11"),
        ("Proofread this letter", "Check this letter for typos"),
        ("Brainstorm names for a cafe", "Suggest names for a cafe"),
    ],
)
def test_entity_ignores_case_and_sentence_starts(a: str, b: str) -> None:
    assert entity_guard(a, b) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("convert list to string", "convert string to list"),
        ("convert a list to a string", "convert the string to a list"),
        ("parse json into a dict", "parse a dict into json"),
        ("from Paris to Rome", "from Rome to Paris"),
        ("is gold heavier than lead", "is lead heavier than gold"),
        ("move money from savings to checking", "move money from checking to savings"),
        ("is silver more expensive than gold", "is gold more expensive than silver"),
        ("Is rent far less expensive than a mortgage?", "Is a mortgage far less expensive than rent?"),
        ("Python is better than Java", "Java is better than Python"),
        ("Divide 10 by 4", "Divide 4 by 10"),
        ("Subtract 7 from 20", "Subtract 20 from 7"),
        ("convert to list from string", "convert list to string"),
    ],
)
def test_order_refuses_swapped_arguments(a: str, b: str) -> None:
    assert order_guard(a, b) == "order"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("convert list to string", "convert a list into a string"),
        ("convert list to string", "turn a list into a string"),
        ("how to sort a list", "how to order a list"),
        ("go from A to B and back from B to A", "go from B to A and back from A to B"),
        (
            "How do I get from the airport to downtown Chicago?",
            "What's the way to get to downtown Chicago from the airport?",
        ),
        ("How do I switch from Android to iPhone?", "How do I move over to an iPhone from an Android phone?"),
        ("Directions from Boston to New York", "Directions to New York from Boston"),
        ("Divide 10 by 4", "Divide ten by four"),
        ("Is silver more expensive than gold?", "Is silver pricier than gold?"),
    ],
)
def test_order_lets_the_same_direction_through(a: str, b: str) -> None:
    assert order_guard(a, b) is None


# -- the whole: paraphrases and near misses ----------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), PARAPHRASES)
def test_true_paraphrases_pass(a: str, b: str) -> None:
    assert guard(a, b) == GuardVerdict(True, None)
    assert guard(b, a) == GuardVerdict(True, None)


def test_every_hand_made_near_miss_is_refused_by_the_guard_it_was_written_for() -> None:
    pairs = _near_misses()
    assert len(pairs) >= 30
    assert len(PARAPHRASES) >= 20
    for pair in pairs:
        forward = guard(pair["query"], pair["cached"])
        backward = guard(pair["cached"], pair["query"])
        assert forward == GuardVerdict(False, pair["kind"]), pair
        assert backward == GuardVerdict(False, pair["kind"]), pair


GUARDED_KINDS = ("entity", "number", "negation", "order", "date")


def test_on_the_chat_query_pairs_the_guards_refuse_hard_non_duplicates_and_keep_duplicates() -> None:
    """Measured on tests/data/cache-query-pairs.jsonl (hand-written chat prompts, query against cached):
    of the 140 non-duplicates of the kinds the guards cover, 128 are refused (91%: order, number, date
    and negation all 100%, entity 32 of 44; the misses are lowercase or common-noun names: "canada" vs
    "australia", "grapes" vs "blueberries"); of the 236 duplicates 15 are refused (6%: synonyms of names,
    typos in names, lexical negation, "twice" vs "two times"). Before the comparative, "to X from Y",
    inverted-question, possessive and imperative fixes: 125 of 140 refused, 33 of 236 duplicates refused."""
    pairs = _query_pairs()
    duplicates = [p for p in pairs if p["duplicate"]]
    hard = [p for p in pairs if not p["duplicate"] and p["kind"] in GUARDED_KINDS]
    assert len(duplicates) >= 200
    assert len(hard) >= 120
    refused_hard = [p for p in hard if not guard(str(p["query"]), str(p["cached"])).ok]
    refused_duplicates = [p for p in duplicates if not guard(str(p["query"]), str(p["cached"])).ok]
    assert len(refused_hard) / len(hard) >= 0.90, f"hard non-duplicates refused: {len(refused_hard)}/{len(hard)}"
    for kind in ("order", "number", "date", "negation"):
        of_kind = [p for p in hard if p["kind"] == kind]
        refused = [p for p in refused_hard if p["kind"] == kind]
        assert len(refused) / len(of_kind) >= 0.95, f"{kind}: {len(refused)}/{len(of_kind)} refused"
    assert len(refused_duplicates) / len(duplicates) <= 0.07, [(p["query"], p["cached"]) for p in refused_duplicates]


def test_the_guards_are_fast_on_short_prompts() -> None:
    pairs = [(p["query"], p["cached"]) for p in _near_misses()] + PARAPHRASES
    start = time.perf_counter()
    for _ in range(5):
        for a, b in pairs:
            guard(a, b)
    per_pair = (time.perf_counter() - start) / (5 * len(pairs))
    assert per_pair < 500e-6, f"{per_pair * 1e6:.0f} µs per pair"


# -- MRPC: measured, not assumed ---------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")


def _overlap(a: str, b: str) -> float:
    x, y = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    return len(x & y) / len(x | y)


def test_on_mrpc_the_guards_refuse_most_close_non_paraphrases_and_keep_some_paraphrases() -> None:
    """Measured on all 4,076 pairs (train + val): of the non-paraphrases sharing at least half their words
    (Jaccard >= 0.5, 398 pairs: the ones an embedder is likely to call near-duplicates) the guards refuse
    78%; of all paraphrases they keep 22% (27% of those at Jaccard >= 0.5). MRPC's "paraphrases" are news
    sentences from different articles that often add or drop a date, a figure or a name, which these
    guards refuse by design; a cache for prompts wants that. A seeded sample of 1,600 pairs keeps the test
    short: on it 75% of 155 close non-paraphrases are refused and 23% of 1,077 paraphrases kept (other
    seeds: 76-78%, 21-23%); the bounds sit a few points under."""
    with MRPC_SAMPLE.open(encoding="utf-8", newline="") as f:
        sample = [
            (int(r[0]), r[1], r[2])
            for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if r and r[0] in ("0", "1")
        ]
    assert len(sample) == 1600
    close_negatives = [(a, b) for label, a, b in sample if label == 0 and _overlap(a, b) >= 0.5]
    positives = [(a, b) for label, a, b in sample if label == 1]
    refused = sum(not guard(a, b).ok for a, b in close_negatives) / len(close_negatives)
    kept = sum(guard(a, b).ok for a, b in positives) / len(positives)
    assert len(close_negatives) >= 100
    assert refused >= 0.70, f"close non-paraphrases refused: {refused:.2f}"
    assert kept >= 0.18, f"paraphrases kept: {kept:.2f}"
