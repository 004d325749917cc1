"""Calibrating the semantic cache's threshold (keel.cache.calibrate, `keel cache calibrate`): the threshold
search on hand-made cosines, the guards' effect on real pairs, the labelled-file reader's errors, and the
command end to end with the local embedder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from keel.cache.calibrate import (
    LabelledPair,
    PairsFileError,
    ScoredPair,
    calibrate,
    choose,
    point_at,
    read_pairs,
    score_pairs,
    sweep,
)
from keel.cli import app
from keel.embedding.model import SentenceEmbedder, load_embedder

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return load_embedder()


def _scored(*rows: tuple[float, bool] | tuple[float, bool, str]) -> list[ScoredPair]:
    return [ScoredPair(*row) for row in rows]


# -- the search on given cosines ----------------------------------------------------------------------

# Four duplicates, three not; one non-duplicate high up is refused by a guard.
SET = _scored(
    (0.95, True), (0.91, False, "number"), (0.90, True), (0.85, False), (0.80, True), (0.70, True), (0.60, False),
)


def test_precision_and_recall_count_pairs_at_or_above_the_threshold() -> None:
    alone = point_at(SET, 0.85, guarded=False)
    assert (alone.served_true, alone.served_false, alone.duplicates) == (2, 2, 4)
    assert alone.precision == pytest.approx(2 / 4) and alone.recall == pytest.approx(2 / 4)
    guarded = point_at(SET, 0.85, guarded=True)
    assert (guarded.served_true, guarded.served_false) == (2, 1)
    assert guarded.precision == pytest.approx(2 / 3) and guarded.recall == pytest.approx(2 / 4)
    # A cosine equal to the threshold is served; recall's denominator keeps the refused duplicates.
    assert point_at(SET, 0.70, guarded=True).served_true == 4
    assert point_at(SET, 0.0, guarded=True).recall == 1.0


def test_nothing_served_has_no_precision() -> None:
    empty = point_at(SET, 0.99, guarded=False)
    assert empty.served == 0 and empty.precision is None and empty.recall == 0.0


def test_recall_never_rises_with_the_threshold() -> None:
    points = sweep(SET, guarded=True)
    recalls = [p.recall for p in points]
    assert recalls == sorted(recalls, reverse=True)
    assert [p.threshold for p in points][:3] == [0.0, 0.001, 0.002] and points[-1].threshold == 1.0


def test_the_lowest_threshold_reaching_the_target_is_chosen() -> None:
    result = choose(SET, 1.0)
    # Guarded: 0.95 and 0.90 are duplicates, 0.91 is refused; at 0.86+ precision is 1, at 0.85 it falls.
    assert result.threshold == pytest.approx(0.851)
    assert result.guarded.precision == 1.0 and result.guarded.recall == pytest.approx(2 / 4)
    assert result.unguarded.threshold == result.threshold
    assert result.unguarded.precision == pytest.approx(2 / 3)  # the refused number pair would be served
    assert result.refused == {"number": (0, 1)}
    # The cosine alone only reaches it above the non-duplicate at 0.91.
    assert result.threshold_alone is not None and result.threshold_alone.threshold == pytest.approx(0.911)
    assert result.reached


def test_a_lower_target_buys_recall() -> None:
    strict, loose = choose(SET, 1.0), choose(SET, 0.75)
    assert loose.threshold is not None and strict.threshold is not None
    assert loose.threshold < strict.threshold
    assert loose.guarded.recall > strict.guarded.recall
    assert loose.guarded.precision is not None and loose.guarded.precision >= 0.75
    # Nothing lower reaches 0.75: one step down serves the 0.60 non-duplicate or another false hit.
    below = point_at(SET, loose.threshold - 0.001, guarded=True)
    assert below.precision is not None and below.precision < 0.75


def test_precision_that_dips_and_recovers_still_gives_the_lowest_threshold() -> None:
    # Precision is not monotone in the threshold: the search must not stop at the first dip.
    dips = _scored((0.9, True), (0.8, False), (0.7, True), (0.6, True), (0.5, True), (0.4, True), (0.3, False))
    result = choose(dips, 0.8)
    assert result.threshold == pytest.approx(0.301)  # 5 of 6 served above 0.3: 0.83; at 0.3, 5 of 7
    assert point_at(dips, 0.75, guarded=True).precision == pytest.approx(0.5)


def test_an_unreachable_target_gives_no_threshold_and_the_best_found() -> None:
    noisy = _scored((0.99, False), (0.97, True), (0.93, False), (0.90, True), (0.5, True))
    result = choose(noisy, 0.9)
    assert result.threshold is None and not result.reached
    assert result.best_guarded.precision == pytest.approx(3 / 5)  # all served: 3 duplicates of 5
    assert result.best_guarded.threshold == 0.0  # lowest among the ties
    assert result.threshold_alone is None
    assert result.guarded == result.best_guarded


def test_the_guards_can_make_an_unreachable_target_reachable() -> None:
    pairs = _scored((0.99, False, "negation"), (0.97, True), (0.95, True), (0.5, False))
    assert choose(pairs, 1.0).threshold == pytest.approx(0.501)
    assert choose([ScoredPair(p.cosine, p.duplicate) for p in pairs], 1.0).threshold is None


def test_a_target_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="target precision"):
        choose(SET, 1.5)
    with pytest.raises(ValueError, match="no pair is labelled duplicate"):
        choose(_scored((0.9, False)), 0.9)


# -- the guards on real pairs -------------------------------------------------------------------------


def test_near_misses_are_close_but_refused_and_paraphrases_kept(embedder: SentenceEmbedder) -> None:
    pairs = [
        LabelledPair("cancel my order", "don't cancel my order", False),
        LabelledPair("I want 3 tickets", "I want 2 tickets", False),
        LabelledPair("convert list to string", "convert string to list", False),
        LabelledPair("How do I reset my password?", "How can I reset my password?", True),
        LabelledPair("What's the capital of France?", "What is the capital of France?", True),
    ]
    scored = score_pairs(pairs, embedder, progress=False)
    assert [s.refused_by for s in scored] == ["negation", "number", "order", None, None]
    assert [s.duplicate for s in scored] == [p.duplicate for p in pairs]
    lowest = min(s.cosine for s in scored)
    assert lowest > 0.7  # all of them close: a threshold alone cannot tell them apart
    assert point_at(scored, lowest, guarded=False).precision == pytest.approx(2 / 5)
    assert point_at(scored, lowest, guarded=True).precision == 1.0
    assert choose(scored, 1.0).threshold == pytest.approx(0.0)  # with the guards any threshold is safe here


def test_a_text_and_itself_score_one(embedder: SentenceEmbedder) -> None:
    [same] = score_pairs([LabelledPair("Why is the sky blue?", "Why is the sky blue?", True)], embedder,
                         progress=False)
    assert same.cosine == pytest.approx(1.0, abs=1e-5) and same.refused_by is None


# -- reading labelled pairs ---------------------------------------------------------------------------


def _file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = '{"query": "a b", "cached": "a c", "duplicate": true}'


def test_reads_pairs_in_either_spelling_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _file(tmp_path, GOOD, "", '{"a": "x", "b": "y", "label": 0}', '{"query": "p", "cached": "q", "label": 1}')
    assert read_pairs(path) == [
        LabelledPair("a b", "a c", True), LabelledPair("x", "y", False), LabelledPair("p", "q", True),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"query": "a", "cached": "b", "duplicate": tru}', "line 2: not valid JSON"),
        ('["a", "b", true]', "line 2: expected a JSON object, got list"),
        ('{"cached": "b", "duplicate": true}', 'line 2: missing "query" or "a"'),
        ('{"query": "a", "duplicate": true}', 'line 2: missing "cached" or "b"'),
        ('{"query": "a", "cached": "b"}', 'line 2: missing "duplicate" or "label"'),
        ('{"query": "a", "cached": "b", "duplicate": "yes"}', 'line 2: the label must be true or false'),
        ('{"query": "a", "cached": "b", "duplicate": 2}', "line 2: the label must be true or false"),
        ('{"query": "", "cached": "b", "duplicate": true}', 'line 2: "query" must be a non-empty string'),
        ('{"query": "a", "cached": 7, "duplicate": true}', 'line 2: "cached" must be a non-empty string'),
    ],
)
def test_a_bad_line_is_named_with_what_is_wrong(tmp_path: Path, line: str, message: str) -> None:
    path = _file(tmp_path, GOOD, line)
    with pytest.raises(PairsFileError) as caught:
        read_pairs(path)
    assert f"{path} {message}" in str(caught.value)


def test_a_file_without_duplicates_or_missing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PairsFileError, match="no pair labelled duplicate"):
        read_pairs(_file(tmp_path, '{"query": "a", "cached": "b", "duplicate": false}'))
    with pytest.raises(PairsFileError, match="cannot read the pairs file"):
        read_pairs(tmp_path / "missing.jsonl")


# -- the command --------------------------------------------------------------------------------------


def _labelled_file(tmp_path: Path) -> Path:
    """Everyday paraphrases (duplicates), the hand-made near misses and unrelated pairs (not)."""
    rows = [
        {"query": "How do I reset my password?", "cached": "How can I reset my password?", "duplicate": True},
        {"query": "What's the capital of France?", "cached": "What is the capital of France?", "duplicate": True},
        {"query": "Who wrote Hamlet?", "cached": "Who is the author of Hamlet?", "duplicate": True},
        {"query": "Explain recursion to me", "cached": "Can you explain recursion to me?", "duplicate": True},
        {"query": "Tell me a joke about cats", "cached": "Tell me a cat joke", "duplicate": True},
        {"query": "How do I undo the last git commit?", "cached": "How can I undo my last git commit?",
         "duplicate": True},
        {"query": "Why is the sky blue?", "cached": "What is the boiling point of water?", "duplicate": False},
        {"query": "Book a flight to Rome", "cached": "Summarise this article", "duplicate": False},
    ]
    for line in (DATA / "cache-near-misses.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        rows.append({"query": record["query"], "cached": record["cached"], "duplicate": False})
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_calibrate_prints_the_threshold_and_writes_the_snippet(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    path = _labelled_file(tmp_path)
    expected = calibrate(read_pairs(path), 0.99, embedder, progress=False)
    assert expected.threshold is not None
    out = tmp_path / "threshold.yaml"

    result = CliRunner().invoke(app, ["cache", "calibrate", "--pairs", str(path), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert f"Threshold: {expected.threshold:.3f}" in result.stdout
    assert "cosine and guards" in result.stdout and "cosine alone" in result.stdout
    assert yaml.safe_load(out.read_text()) == {"cache": {"semantic": {"threshold": expected.threshold}}}


def test_calibrate_json_carries_both_operating_points(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    path = _labelled_file(tmp_path)
    expected = calibrate(read_pairs(path), 0.9, embedder, progress=False)

    args = ["cache", "calibrate", "--pairs", str(path), "--json", "--target-precision", "0.9"]
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reached"] is True and report["threshold"] == expected.threshold
    assert report["pairs"] == 8 + 36 and report["duplicates"] == 6
    assert report["with_guards"]["precision"] >= 0.9
    assert report["with_guards"]["served_false"] <= report["without_guards"]["served_false"]
    assert report["without_guards"]["threshold"] == report["threshold"]


def test_calibrate_exits_1_when_the_target_cannot_be_reached(tmp_path: Path) -> None:
    # The same text labelled both ways: no threshold separates them, with or without the guards.
    path = _file(
        tmp_path,
        '{"query": "Why is the sky blue?", "cached": "Why is the sky blue?", "duplicate": false}',
        '{"query": "Why is the sky blue?", "cached": "Why is the sky blue?", "duplicate": true}',
    )
    out = tmp_path / "threshold.yaml"
    result = CliRunner().invoke(app, ["cache", "calibrate", "--pairs", str(path), "--out", str(out)])
    assert result.exit_code == 1
    assert "no threshold reaches precision 0.99 with the guards; the best is 50.0%" in result.stderr
    assert not out.exists()


def test_calibrate_names_the_bad_line_and_exits_2(tmp_path: Path) -> None:
    path = _file(tmp_path, GOOD, GOOD, '{"query": "a", "cached": "b", "duplicate": "maybe"}')
    result = CliRunner().invoke(app, ["cache", "calibrate", "--pairs", str(path)])
    assert result.exit_code == 2
    assert "line 3: the label must be true or false" in result.stderr
    bad_target = CliRunner().invoke(app, ["cache", "calibrate", "--pairs", str(path), "--target-precision", "0"])
    assert bad_target.exit_code == 2 and "--target-precision must be above 0" in bad_target.stderr
