"""Guards for the semantic cache: may two prompts an embedder found similar share an answer?

An embedder scores "cancel my order" and "don't cancel my order" as near-duplicates; so are "2 tickets"
and "3 tickets", "flights to Paris" and "flights to Rome", "convert list to string" and "convert string
to list". `guard(query, cached)` runs cheap, model-free checks on the two texts and refuses the hit when
one of them finds a difference that changes the answer. Pure Python, regular expressions only: tens to
a few hundred microseconds for short prompts. Not wired into the pipeline yet.

The guards err on the side of refusing: a refused true paraphrase costs one upstream call, a served false
hit costs a wrong answer. Each returns None (no objection) or its name, which `GuardVerdict.reason` carries.

negation
    Cues: not, no, never, without, cannot, nor, none, nothing, nobody, neither, nowhere, and any word
    ending in "n't" ("don't", "won't", "can't"; curly apostrophes too). Refuses when the two texts have a
    different number of cues, or when the sets of negated heads differ: the head is the first word after
    a cue that is not a filler (auxiliary, article, pronoun, "really", "ever" ...), so "don't cancel" and
    "do not cancel" both give {cancel}. A negated auxiliary that is not a copula ("won't", "doesn't",
    "can't"; not "isn't") followed by a determiner is read as an inverted question and the determiner and
    one noun (and a model number) are skipped, so "why won't my laptop turn on" and "my laptop won't turn
    on" both give {turn on}; a particle (on, off, up, down, in, out) right after the head belongs to it.
    Limits: no parsing of scope, so a paraphrase that negates a different word ("does not work" vs
    "doesn't function") or lexical negation ("forget" vs "don't remember", "can't" vs "unable",
    "without" vs "-free") is refused or missed; a longer inverted subject ("won't my old laptop turn on")
    gives the wrong head, which refuses; double negation is not cancelled out.

number
    Multisets of numbers: digits ("1,000" = "1000", "2.50" = "2.5", "1st" = 1, "4.4%" = 4.4), digits
    followed by a scale word ("2.5 million"), and number words zero to ninety-nine with hundred,
    thousand, million, billion ("twenty-five" = 25, "two hundred" = 200), "dozen" = 12. "one" after a
    determiner ("which one", "this one", "no one") is not a number. Limits: ordinal words ("first",
    "third"), fractions in words ("half"), "a couple", "once/twice" and roman numerals are not read;
    times ("3pm" vs "15:00") and units are not normalised, so equal quantities written differently are
    refused.

date
    Weekday names ("Mondays" = "Monday"), month names (full, and unambiguous abbreviations; "May" and
    "March" only capitalised and not at a sentence start), years 1900-2099, relative words (today,
    tonight, tomorrow, yesterday; "now" is not one) and "next/last/this" + week/month/year/weekend/a
    weekday, ISO dates (2024-05-01) and d/m/y or m/d/y dates (as written); a possessive is dropped
    ("tomorrow's weather" = "weather tomorrow"). Differing sets refuse.
    Limits: "the day after tomorrow" is just "tomorrow"; "in two weeks" is left to the number guard;
    "5/1/2024" and "2024-01-05" are not recognised as the same day.

entity
    Proper nouns and quoted strings, compared lowercased and without a possessive "'s" ("Australia's" =
    "Australia"; "It's", "What's", "Let's" are contractions and stay): runs of capitalised words not at
    a sentence start ("New York"), sentence-initial capitalised words unless they are common words
    (question words, pronouns, greetings and apologies, some 150 imperatives of chat requests such as
    "Convert", "Compose", "Integrate", "Rewrite", "Reserve") or look like verb/adverb forms (-ing, -ed, -ly),
    and text of up to six words inside double quotes, backticks or single quotes (a longer quotation is
    prose: only its proper nouns count). An entity in one text that is missing from
    the other refuses, unless every word of it appears in the other text anyway (so "paris" typed in
    lowercase matches "Paris"). Limits: lowercase proper nouns are not found ("flights to paris" vs
    "flights to rome" passes this guard); synonyms of names ("NYC" vs "New York", "the US" vs "America")
    are refused; all-lowercase identifiers outside quotes are ordinary words; an imperative missing from
    the list, or a name that is also a listed verb ("Mark", "Order") at a sentence start, is misread.

order
    Directed pairs (a, b) of content words on either side of to, into, onto, from, than, by: every word
    of the run of up to three content words just before the link, with every word of the run just after
    it (function words before a run are skipped; one after it, a punctuation mark or another link ends
    the run). A "from" pair is turned round (source first), so "to X from Y" is the same direction as
    "from Y to X". Before "than", comparative fillers (more, less, much, far, a lot, is, are ...) are
    skipped, so "is silver more expensive than gold" and "silver is better than gold" give (silver,
    gold). Refuses when one text has (a, b), the other has (b, a) and not (a, b): "convert list to string"
    vs "convert a string to a list", "from Paris to Rome" vs "to Paris from Rome", "is gold heavier than
    lead" vs "is lead heavier than gold", "divide 10 by 4" vs "divide 4 by 10". Limits: other swaps ("A
    beats B" vs "B beats A", "sort by name then date" vs "by date then name", "X is worse than Y" vs "Y
    is better than X") are not found; a passive ("written by X") and an active sentence that share
    words across different links can look swapped, which refuses.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["GUARDS", "GuardVerdict", "guard"]


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    """`ok` is True when the cached answer may be served; otherwise `reason` names the guard that refused."""

    ok: bool
    reason: str | None = None


_TOKEN = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|[A-Za-z]+(?:'[A-Za-z]+)*")


def _normalise(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')


# "'s" that is "is"/"has"/"us" after these words is kept: "it's" is not a possessive of "it".
_CONTRACTED_S = frozenset(
    {
        "it", "that", "what", "there", "here", "he", "she", "who", "where", "how", "let", "why", "when",
        "this", "everything", "nothing", "something", "someone", "everyone", "everybody", "somebody",
    }
)  # fmt: skip


def _unpossess(word: str) -> str:
    """Drop a possessive "'s": "australia's" is "australia"; "it's", "what's" and "let's" stay."""
    if word.endswith("'s") and word[:-2].lower() not in _CONTRACTED_S:
        return word[:-2]
    return word


def _words(text: str) -> list[str]:
    return [_unpossess(m.group().lower()) for m in _TOKEN.finditer(text.replace("\u2019", "'"))]


_TOKEN_OR_STOP = re.compile(_TOKEN.pattern + r"|[,;:.!?()]")


def _words_and_stops(text: str) -> list[str]:
    """`_words`, with the punctuation marks that end a clause kept as tokens of their own."""
    return [_unpossess(m.group().lower()) for m in _TOKEN_OR_STOP.finditer(text.replace("\u2019", "'"))]


# -- negation ---------------------------------------------------------------------------------------

_NEG_CUES = frozenset(
    {"not", "no", "never", "without", "cannot", "nor", "none", "nothing", "nobody", "neither", "nowhere"}
)
_FILLER = frozenset(
    {
        "a", "an", "the", "be", "been", "being", "to", "really", "ever", "even", "yet", "at", "all",
        "i", "you", "we", "he", "she", "it", "they", "me", "my", "your", "our", "its", "their", "them",
        "have", "has", "had", "do", "does", "did", "is", "are", "was", "were", "am", "so", "just",
        "longer", "any", "always", "actually", "please", "want", "need", "going", "able", "get",
        "can", "could", "will", "would", "should", "may", "might", "must", "of", "for", "one",
    }
)  # fmt: skip


def _is_neg(word: str) -> bool:
    return word in _NEG_CUES or word.endswith("n't")


# A negated auxiliary (not a copula) followed by a determiner is inverted, as in a question: "why won't
# my laptop turn on" has the subject "my laptop" between the cue and the verb, "turn".
_INVERTING = frozenset(
    {
        "don't", "doesn't", "didn't", "won't", "wouldn't", "can't", "couldn't", "shouldn't", "hasn't",
        "haven't", "hadn't", "mustn't", "mightn't", "shan't",
    }
)  # fmt: skip
_DETERMINERS = frozenset(
    {"my", "your", "our", "their", "his", "her", "its", "the", "this", "that", "these", "those", "a", "an"}
)
_PARTICLES = frozenset({"on", "off", "up", "down", "in", "out"})
_STOPS = frozenset(",;:.!?()")


def _negations(words: list[str]) -> tuple[int, frozenset[str]]:
    count = 0
    heads: set[str] = set()
    n = len(words)
    for i, w in enumerate(words):
        if not _is_neg(w):
            continue
        count += 1
        j = i + 1
        if w in _INVERTING and j + 1 < n and words[j] in _DETERMINERS and words[j + 1].isalnum():
            j += 2  # skip the determiner and the subject noun ...
            while j < n and words[j][0].isdigit():
                j += 1  # ... and a model number ("my iphone 15")
        while j < n:
            nxt = words[j]
            if _is_neg(nxt):
                break
            if nxt not in _FILLER and nxt not in _STOPS:
                particle = words[j + 1] if j + 1 < n and words[j + 1] in _PARTICLES else ""
                heads.add(f"{nxt} {particle}" if particle else nxt)
                break
            j += 1
    return count, frozenset(heads)


def negation_guard(a: str, b: str) -> str | None:
    """Refuse when one text negates something the other does not."""
    return None if _negations(_words_and_stops(a)) == _negations(_words_and_stops(b)) else "negation"


# -- numbers ----------------------------------------------------------------------------------------

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "dozen": 12,
}  # fmt: skip
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000, "trillion": 1_000_000_000_000}
_NOT_ONE_AFTER = frozenset({"which", "this", "that", "the", "any", "each", "every", "no", "some", "another", "other"})
_ORDINAL_SUFFIX = re.compile(r"(\d)(?:st|nd|rd|th)\b", re.IGNORECASE)


def _canon(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _numbers(text: str) -> Counter[str]:
    words = _words(_ORDINAL_SUFFIX.sub(r"\1", text))
    out: Counter[str] = Counter()
    i = 0
    n = len(words)
    while i < n:
        w = words[i]
        if w[0].isdigit():
            value = float(w.replace(",", ""))
            if i + 1 < n and words[i + 1] in _SCALES:
                value *= _SCALES[words[i + 1]]
                i += 1
            elif i + 1 < n and words[i + 1] == "hundred":
                value *= 100
                i += 1
            out[_canon(value)] += 1
            i += 1
            continue
        if w in _UNITS or w in _TENS:
            if w == "one" and i > 0 and words[i - 1] in _NOT_ONE_AFTER:
                i += 1
                continue
            total = 0
            current = 0
            seen = False
            while i < n:
                w = words[i]
                if w in _UNITS:
                    current += _UNITS[w]
                elif w in _TENS:
                    current += _TENS[w]
                elif w == "hundred" and seen:
                    current = max(current, 1) * 100
                elif w in _SCALES and seen:
                    total += max(current, 1) * _SCALES[w]
                    current = 0
                elif w == "and" and seen and i + 1 < n and (words[i + 1] in _UNITS or words[i + 1] in _TENS):
                    pass
                else:
                    break
                seen = True
                i += 1
            out[_canon(total + current)] += 1
            continue
        i += 1
    return out


def number_guard(a: str, b: str) -> str | None:
    """Refuse when the two texts mention different numbers (as multisets)."""
    return None if _numbers(a) == _numbers(b) else "number"


# -- dates and times --------------------------------------------------------------------------------

_WEEKDAYS = {d: d for d in ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")}
_MONTHS = {
    m: m
    for m in (
        "january", "february", "march", "april", "may", "june", "july", "august", "september",
        "october", "november", "december",
    )
}  # fmt: skip
_MONTHS.update(
    {"jan": "january", "feb": "february", "apr": "april", "aug": "august", "sept": "september",
     "sep": "september", "oct": "october", "nov": "november", "dec": "december"}
)  # fmt: skip
_AMBIGUOUS_MONTHS = frozenset({"may", "march"})
_RELATIVE = frozenset({"today", "tonight", "tomorrow", "yesterday"})
_PERIODS = frozenset({"week", "month", "year", "weekend", *_WEEKDAYS})
_DATE_PATTERN = re.compile(r"\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}[/.]\d{1,2}[/.]\d{2,4}\b")
_YEAR = re.compile(r"\b(?:19|20)\d{2}\b")
_CAP_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def _at_sentence_start(text: str, start: int) -> bool:
    before = text[:start].rstrip().rstrip("\"'([`*-").rstrip()
    return not before or before[-1] in ".!?:\n"


def _dates(text: str) -> frozenset[str]:
    found: set[str] = set(_DATE_PATTERN.findall(text))
    stripped = _DATE_PATTERN.sub(" ", text)
    found.update(_YEAR.findall(stripped))
    prev = ""
    for m in _CAP_WORD.finditer(stripped):
        raw = m.group()
        w = _unpossess(raw.lower())
        if w.endswith("days") and w[:-1] in _WEEKDAYS:
            w = w[:-1]
        if w in _WEEKDAYS:
            found.add(w)
        elif w in _MONTHS:
            if w not in _AMBIGUOUS_MONTHS or (raw[0].isupper() and not _at_sentence_start(stripped, m.start())):
                found.add(_MONTHS[w])
        elif w in _RELATIVE:
            found.add(w)
        if prev in ("next", "last", "this") and w in _PERIODS:
            found.add(f"{prev} {w}")
        prev = w
    return frozenset(found)


def date_guard(a: str, b: str) -> str | None:
    """Refuse when the two texts mention different days, months, years or relative dates."""
    return None if _dates(a) == _dates(b) else "date"


# -- named entities ---------------------------------------------------------------------------------

_COMMON_INITIAL = frozenset(
    {
        "what", "what's", "whats", "how", "how's", "why", "when", "where", "where's", "who", "who's", "whom",
        "which", "whose", "is", "are", "was", "were", "am", "can", "could", "do", "does", "did", "should",
        "would", "will", "shall", "may", "might", "must", "have", "has", "had", "please", "the", "a", "an",
        "i", "i'm", "i've", "i'd", "i'll", "my", "me", "we", "we're", "our", "you", "your", "it", "it's",
        "its", "this", "that", "these", "those", "there", "there's", "here", "they", "their", "he", "she",
        "his", "her", "tell", "give", "show", "write", "explain", "list", "find", "convert", "make", "help",
        "hi", "hello", "hey", "thanks", "thank", "any", "in", "on", "for", "to", "if", "and", "but", "so",
        "or", "after", "before", "with", "without", "from", "by", "at", "of", "about", "as", "also", "then",
        "now", "ok", "okay", "yes", "no", "not", "don't", "never", "just", "get", "go", "let", "let's",
        "create", "generate", "describe", "summarize", "summarise", "translate", "compare", "calculate",
        "define", "check", "add", "remove", "delete", "set", "change", "update", "use", "using", "fix",
        "cancel", "book", "send", "reset", "some", "all", "each", "every", "one", "two", "best", "good",
        "new", "other", "another", "many", "much", "most", "more", "only", "even", "still", "however",
        "meanwhile", "instead", "under", "over", "since", "while", "although", "though", "because",
        "earlier", "later", "last", "next", "first", "today", "yesterday", "tomorrow", "according",
        "both", "such", "several", "few", "why's", "suggest", "recommend", "name", "say", "try", "need",
        # imperatives and openers of chat requests
        "compose", "draft", "rewrite", "rephrase", "paraphrase", "reword", "outline", "brainstorm",
        "compute", "solve", "integrate", "differentiate", "simplify", "factor", "factorise", "factorize",
        "expand", "evaluate", "estimate", "prove", "derive", "build", "design", "plan", "draw", "sketch",
        "reserve", "order", "buy", "schedule", "shorten", "lengthen", "condense", "extend", "improve",
        "debug", "refactor", "optimise", "optimize", "sort", "reverse", "count", "proofread", "edit",
        "format", "correct", "review", "analyse", "analyze", "classify", "identify", "extract", "parse",
        "implement", "code", "run", "install", "configure", "setup", "enable", "disable", "turn", "open",
        "close", "start", "stop", "restart", "unsubscribe", "subscribe", "sign", "log", "login", "register",
        "track", "locate", "search", "look", "lookup", "read", "teach", "answer", "guess", "predict",
        "imagine", "pretend", "act", "continue", "repeat", "rank", "rate", "score", "choose", "pick",
        "select", "determine", "clarify", "elaborate", "illustrate", "demonstrate", "remind", "note", "keep",
        "cook", "recipe", "sorry", "pardon", "excuse", "greetings", "thx", "cheers", "dear", "yo", "quick",
        "quickly", "briefly", "kindly", "share", "provide", "produce", "prepare", "put", "move", "transfer",
        "copy", "paste", "save", "export", "import", "merge", "split", "join", "combine", "filter", "group",
        "map", "test", "verify", "validate", "fill", "complete", "finish", "respond", "reply", "email",
        "text", "call", "ask", "remember", "forget", "ignore", "assume", "consider", "given",
    }
)  # fmt: skip
_VERBISH = re.compile(r"(?:ing|ed|ly)$")
_NOT_ENTITY = frozenset({"i", "i'm", "i've", "i'd", "i'll", "ok"})
_MAX_QUOTED_WORDS = 6  # a longer quotation is prose, not a literal: its names are read as words
_QUOTED = re.compile(r'"([^"\n]+)"|`([^`\n]+)`|(?<![\w])\'([^\'\n]+)\'(?![\w])')


def _entities(text: str) -> set[str]:
    found: set[str] = set()
    for m in _QUOTED.finditer(text):
        inner = next(g for g in m.groups() if g is not None).lower().split()
        if len(inner) <= _MAX_QUOTED_WORDS:
            found.add(" ".join(inner))
    phrase: list[str] = []
    last_end = -1
    for m in _CAP_WORD.finditer(text):
        raw = m.group()
        low = _unpossess(raw.lower())
        is_entity = (
            raw[0].isupper()
            and low not in _NOT_ENTITY
            and low not in _MONTHS
            and low.removesuffix("s") not in _WEEKDAYS
        )
        if is_entity and _at_sentence_start(text, m.start()):
            is_entity = low not in _COMMON_INITIAL and not _VERBISH.search(low)
        contiguous = last_end >= 0 and text[last_end : m.start()].strip() == ""
        if is_entity and phrase and contiguous:
            phrase.append(low)
        else:
            if phrase:
                found.add(" ".join(phrase))
            phrase = [low] if is_entity else []
        last_end = m.end()
    if phrase:
        found.add(" ".join(phrase))
    return found


def _unmatched(mine: set[str], theirs: set[str], their_words: set[str]) -> bool:
    return any(e not in theirs and not set(_words(e)) <= their_words for e in mine)


def entity_guard(a: str, b: str) -> str | None:
    """Refuse when one text names a person, place, product or quoted string that the other does not."""
    ea, eb = _entities(a), _entities(b)
    if ea == eb:
        return None
    if _unmatched(ea, eb, set(_words(b))) or _unmatched(eb, ea, set(_words(a))):
        return "entity"
    return None


# -- argument order ---------------------------------------------------------------------------------

_LINKS = frozenset({"to", "into", "onto", "from", "than", "by"})
# Between a comparative and the subject before it ("silver is far more expensive than"): skipped, not an end.
_THAN_SKIP = frozenset({"more", "less", "much", "far", "way", "lot", "bit", "little", "is", "are", "was", "were", "be"})
_FUNCTION = frozenset(
    {
        "a", "an", "the", "my", "your", "our", "their", "his", "her", "its", "this", "that", "these",
        "those", "some", "any", "i", "you", "we", "it", "me", "us", "them", "how", "what", "is", "are",
        "do", "does", "can", "could", "should", "would", "want", "need", "way", "best", "go", "get",
        "back", "all", "of", "and", "or", "in", "on", "at", "with", "for", "one", "more", "less",
    }
)  # fmt: skip


def _phrase(words: list[str], skip: frozenset[str] = frozenset()) -> list[str]:
    """The first run of up to three content words in `words` (leading function words and `skip` skipped)."""
    out: list[str] = []
    for w in words:
        if w in _LINKS or w in _STOPS or len(out) == 3:
            break
        if w in skip:
            continue
        if w in _FUNCTION:
            if out:
                break
            continue
        out.append(w)
    return out


def _pairs(words: list[str]) -> set[tuple[str, str]]:
    pairs: set[tuple[str, str]] = set()
    for i, w in enumerate(words):
        if w not in _LINKS:
            continue
        left = _phrase(words[:i][::-1], _THAN_SKIP if w == "than" else frozenset())
        right = _phrase(words[i + 1 :])
        if w == "from":  # "to X from Y" goes the same way as "from Y to X": the source comes first
            left, right = right, left
        pairs.update((x, y) for x in left for y in right if x != y)
    return pairs


def order_guard(a: str, b: str) -> str | None:
    """Refuse when the two texts put the same two words on opposite sides of to/into/from/than."""
    pa, pb = _pairs(_words_and_stops(a)), _pairs(_words_and_stops(b))
    for x, y in pa:
        if (y, x) in pb and (x, y) not in pb:
            return "order"
    for x, y in pb:
        if (y, x) in pa and (x, y) not in pa:
            return "order"
    return None


# -- all of them ------------------------------------------------------------------------------------

GUARDS: tuple[Callable[[str, str], str | None], ...] = (
    negation_guard,
    date_guard,
    number_guard,
    entity_guard,
    order_guard,
)


def guard(query: str, cached: str) -> GuardVerdict:
    """May the answer cached for `cached` be served for `query`? The first guard that objects refuses."""
    a, b = _normalise(query), _normalise(cached)
    for check in GUARDS:
        reason = check(a, b)
        if reason is not None:
            return GuardVerdict(False, reason)
    return GuardVerdict(True)
