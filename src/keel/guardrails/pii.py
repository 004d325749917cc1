"""PII and secrets in text, found by pattern: Presidio's recognizers called directly, Keel's own phone
number pattern, and the secret patterns of `keel.guardrails.secrets`.

What it finds by default ("pattern entity types"): EMAIL_ADDRESS, CREDIT_CARD, IBAN_CODE, US_SSN,
IP_ADDRESS, URL and PHONE_NUMBER, plus the secrets API_KEY, AUTH_TOKEN, PRIVATE_KEY, CONNECTION_STRING
and PASSWORD. More of Presidio's pattern recognizers can be asked for by name (`OPTIONAL_ENTITIES`:
CRYPTO, MAC_ADDRESS, US_BANK_NUMBER, US_DRIVER_LICENSE, US_ITIN, US_PASSPORT, UUID); their scores are
low and their precision poor, so they are off unless named. Names, places and organisations need an
NER model: not covered here.

How, and why (bench/guardrails_pii.py measures each choice):

- No `AnalyzerEngine`: with the no-op NLP engine it still tokenises nothing useful, and its per-call
  overhead (registry lookups, context enhancement with no context, result deduplication) costs more
  than the regexes. Each chosen recognizer's `analyze` is called directly.
- Each recognizer runs only when a cheap C-speed prefilter says its entity can be in the text (an
  `@` for an email, twelve digits for a card, two letters and two digits for an IBAN...): clean text
  costs a handful of `re.search` calls.
- Presidio's phone recognizer (the `phonenumbers` library over every region) cost 11 ms per KB and
  found 61% of the labelled phone numbers; Keel's own phone pattern replaces it: unambiguous shapes
  (`+44 ...`, `(602)272-9781`, `780-999-2181`, with an `x123` extension) on their own, looser digit
  groups (`0490 75 40 81`, `467 3395`, `03.93.92.16.85`) only next to a word such as phone, call,
  mobile, fax, desk or office.
- Presidio's card recognizer only accepts cards starting 1, 3, 4, 5 or 6: Mastercard's 2-series and
  JCB's 2131 were missed. Cards are Keel's own: 12 to 19 digits in groups that pass the Luhn check.
- The email recognizer checks the domain with `tldextract`, whose default extractor downloads the
  public suffix list: it is given an extractor with no URLs (the bundled snapshot, no network).
- Results under `score_threshold` (0.4) are dropped; overlapping results are resolved by priority
  (secrets, then card, IBAN, SSN, email, IP, then URL, then phone), then score, then length: an SSN
  is not also a phone number, and an email's domain is not also a URL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

from keel.errors import ModelNotLoaded
from keel.guardrails.secrets import SECRET_TYPES, find_secrets

INSTALL: Final = "pip install 'keel[guardrails]'"

EMAIL_ADDRESS: Final = "EMAIL_ADDRESS"
PHONE_NUMBER: Final = "PHONE_NUMBER"
CREDIT_CARD: Final = "CREDIT_CARD"
US_SSN: Final = "US_SSN"
IBAN_CODE: Final = "IBAN_CODE"
IP_ADDRESS: Final = "IP_ADDRESS"
URL: Final = "URL"

PATTERN_ENTITIES: Final = frozenset({EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, US_SSN, IBAN_CODE, IP_ADDRESS, URL})
OPTIONAL_ENTITIES: Final = frozenset({
    "CRYPTO", "MAC_ADDRESS", "US_BANK_NUMBER", "US_DRIVER_LICENSE", "US_ITIN", "US_PASSPORT", "UUID",
})
# Need an NER model (not part of the guardrails extra): reported as not covered.
NER_ENTITIES: Final = frozenset({"PERSON", "LOCATION", "ORGANIZATION", "NRP", "DATE_TIME"})
SUPPORTED_ENTITIES: Final = PATTERN_ENTITIES | OPTIONAL_ENTITIES | SECRET_TYPES

# Higher wins when two results overlap.
_PRIORITY: Final[dict[str, int]] = {
    **dict.fromkeys(SECRET_TYPES, 100),
    CREDIT_CARD: 50, IBAN_CODE: 50, US_SSN: 50, EMAIL_ADDRESS: 50, IP_ADDRESS: 45, "CRYPTO": 45, "UUID": 45,
    "MAC_ADDRESS": 45, URL: 30, "US_PASSPORT": 25, "US_ITIN": 25, PHONE_NUMBER: 20,
    "US_DRIVER_LICENSE": 10, "US_BANK_NUMBER": 10,
}


class GuardrailsNotInstalled(ModelNotLoaded):
    """PII detection needs Presidio, which the guardrails extra installs."""

    code = "guardrails_not_installed"


@dataclass(frozen=True, slots=True)
class Entity:
    type: str
    start: int
    end: int
    score: float


@dataclass(frozen=True, slots=True)
class Check:
    """One recognizer: `find(text)` gives (type, start, end, score); `maybe(text)` is its prefilter."""

    name: str
    types: frozenset[str]
    maybe: Callable[[str], object]
    find: Callable[[str], list[tuple[str, int, int, float]]]

    def run(self, text: str) -> list[tuple[str, int, int, float]]:
        return self.find(text) if self.maybe(text) else []


# ---------------------------------------------------------------------------- Keel's own patterns

_SEP = r"[ .\-]"
_EXT = r"(?:\s?(?:x|ext\.?|#)\s?\d{1,6})?"
# Shapes that are phone numbers without any context.
_PHONE_STRONG: Final = re.compile(
    r"(?<![\w+\-.])(?:"
    r"\+\d{1,3}" + _SEP + r"?(?:\(0\)" + _SEP + r"?)?(?:\(\d{1,4}\)" + _SEP + r"?)?"
    r"\d{1,5}(?:" + _SEP + r"?\d{2,5}){1,4}"
    r"|(?:001" + _SEP + r"?|1" + _SEP + r")?(?:\(\d{3}\)" + _SEP + r"?|\d{3}" + _SEP + r")\d{3}" + _SEP + r"\d{4}"
    r")" + _EXT + r"(?![\w\-.]?\d)"
)
# Looser digit groups: a phone number only next to a word that says so.
_PHONE_WEAK: Final = re.compile(
    r"(?<![\w+\-.])(?:\(\d{1,4}\)\s?)?\d{2,12}(?:" + _SEP + r"\d{2,8}){0,4}" + _EXT + r"(?![\w\-.]?\d)"
)
_CONTEXT_BEFORE: Final = re.compile(
    r"(?i)phone|\btel\b|\bcall|mobile|\bcell|\bdesk\b|\bfax\b|contact|reach|whatsapp|"
    r"\bsms\b|\btext me|messages? (?:to|at|on)|answering|registered|\bdial"
)
_CONTEXT_AFTER: Final = re.compile(r"(?i)[\s\-]{0,3}(?:office|fax|mobile|phone|cell|home|work|desk)\b")
_DIGIT_RUN_7: Final = re.compile(r"\d(?:\D{0,3}\d){6}")


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


def find_phones(text: str) -> list[tuple[str, int, int, float]]:
    """Phone numbers: unambiguous shapes anywhere (score 0.6), looser digit groups (7 to 15 digits) only
    with a phone word up to 40 characters before or right after (0.4, Presidio's own phone score). On
    overlap the longer wins ("21 284 698 2548" whole, not its NANP-shaped tail), scored 0.6 if it holds
    an unambiguous shape."""
    strong = [m.span() for m in _PHONE_STRONG.finditer(text) if 7 <= _digits(m.group()) <= 18]
    candidates = [(start, end, 0.6) for start, end in strong]
    for match in _PHONE_WEAK.finditer(text):
        start, end = match.span()
        if 7 <= _digits(match.group()) <= 15 and (
            _CONTEXT_BEFORE.search(text, max(0, start - 40), start) or _CONTEXT_AFTER.match(text, end)
        ):
            holds_strong = any(start <= s and e <= end for s, e in strong)
            candidates.append((start, end, 0.6 if holds_strong else 0.4))
    if len(candidates) < 2:
        return [(PHONE_NUMBER, start, end, score) for start, end, score in candidates]
    kept: list[tuple[int, int, float]] = []
    for start, end, score in sorted(candidates, key=lambda c: c[0] - c[1]):
        if all(end <= s or e <= start for s, e, _ in kept):
            kept.append((start, end, score))
    return [(PHONE_NUMBER, start, end, score) for start, end, score in sorted(kept)]


_CARD_RUN: Final = re.compile(r"(?<![\w\-+])\d(?:[ \-]?\d){11,22}(?![\d\-]?\d)")
_CARD_GROUP: Final = re.compile(r"\d+")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = ord(char) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def find_cards(text: str) -> list[tuple[str, int, int, float]]:
    """12 to 19 digits in groups (single spaces or dashes between them) that pass the Luhn check; in a
    longer run, the longest such series of whole groups from each group on."""
    found: list[tuple[str, int, int, float]] = []
    for run in _CARD_RUN.finditer(text):
        groups = [m.span() for m in _CARD_GROUP.finditer(run.group())]
        i = 0
        while i < len(groups):
            digits, best = "", None
            for j in range(i, len(groups)):
                digits += run.group()[groups[j][0]:groups[j][1]]
                if len(digits) > 19:
                    break
                if len(digits) >= 12 and luhn_valid(digits):
                    best = j
            if best is None:
                i += 1
                continue
            found.append((CREDIT_CARD, run.start() + groups[i][0], run.start() + groups[best][1], 1.0))
            i = best + 1
    return found


# ---------------------------------------------------------------------------- Presidio's recognizers


_SPACE: Final = re.compile(r"\s")


def _token_windows(text: str, trigger: re.Pattern[str]) -> list[tuple[int, int]]:
    """The whitespace-delimited stretches of `text` around each match of `trigger`, merged."""
    windows: list[tuple[int, int]] = []
    end = 0
    for match in trigger.finditer(text):
        if match.start() < end:
            continue
        start = match.start()
        while start > 0 and not text[start - 1].isspace():
            start -= 1
        after = _SPACE.search(text, match.end())
        end = after.start() if after else len(text)
        windows.append((start, end))
    return windows


def _presidio_check(
    name: str, recognizer: Any, entity: str, maybe: Callable[[str], object], token: re.Pattern[str] | None = None,
) -> Check:
    """A Presidio recognizer called directly: on the whole text, or with `token` (for entities without
    whitespace: emails, URLs) only on the whitespace-delimited stretches around that trigger's matches,
    so that its slow patterns (the `regex` module, case-insensitive, hundreds of TLDs) read a few
    words instead of the whole text."""
    if token is None:
        def find(text: str) -> list[tuple[str, int, int, float]]:
            return [(r.entity_type, r.start, r.end, r.score) for r in recognizer.analyze(text, [entity], None)]
    else:
        def find(text: str) -> list[tuple[str, int, int, float]]:
            return [
                (r.entity_type, start + r.start, start + r.end, r.score)
                for start, end in _token_windows(text, token)
                for r in recognizer.analyze(text[start:end], [entity], None)
            ]
    return Check(name, frozenset({entity}), maybe, find)


class _Upper:
    """A recognizer that reads the text in capitals (Presidio's IBAN check rejects `gb42nawi...`)."""

    def __init__(self, recognizer: Any) -> None:
        self.recognizer = recognizer

    def __call__(self) -> _Upper:
        return self

    def analyze(self, text: str, entities: list[str], nlp_artifacts: None) -> Any:
        upper = text.upper()
        return self.recognizer.analyze(upper if len(upper) == len(text) else text, entities, nlp_artifacts)


def _search(regex: str, flags: int = 0) -> Callable[[str], object]:
    return re.compile(regex, flags).search


def _presidio_checks(entities: Collection[str]) -> list[Check]:
    try:
        import tldextract
        from presidio_analyzer import predefined_recognizers as pr
    except ImportError as exc:
        raise GuardrailsNotInstalled(
            f"PII detection needs Presidio ({exc.name} is not installed): run {INSTALL}"
        ) from None

    extractor = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)  # the bundled list, no network

    class EmailRecognizer(pr.EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return extractor(pattern_text).fqdn != ""

    class UrlRecognizer(pr.UrlRecognizer):
        def validate_result(self, pattern_text: str) -> bool | None:
            return None

    email, url = re.compile(r"\w@\w"), re.compile(r"[A-Za-z0-9]\.[A-Za-z]{2}")
    windowed = {EMAIL_ADDRESS: email, URL: url}
    table: dict[str, tuple[Callable[[], Any], Callable[[str], object]]] = {
        EMAIL_ADDRESS: (EmailRecognizer, email.search),
        IBAN_CODE: (_Upper(pr.IbanRecognizer()), _search(r"[A-Za-z]{2}\d{2}")),
        US_SSN: (pr.UsSsnRecognizer, _search(r"\d{3}[- .]?\d{2}[- .]?\d{4}")),
        IP_ADDRESS: (pr.IpRecognizer, _search(r"\d\.\d{1,3}\.\d|[0-9A-Fa-f]:[0-9A-Fa-f]*:|::")),
        URL: (UrlRecognizer, url.search),
        "CRYPTO": (pr.CryptoRecognizer, _search(r"\b(?:bc1|[13])[A-Za-z0-9]{25}")),
        "MAC_ADDRESS": (pr.MacAddressRecognizer, _search(r"[0-9A-Fa-f]{2}[:\-.][0-9A-Fa-f]{2}")),
        "US_BANK_NUMBER": (pr.UsBankRecognizer, _search(r"\d{8}")),
        "US_DRIVER_LICENSE": (pr.UsLicenseRecognizer, _search(r"\d{2}")),
        "US_ITIN": (pr.UsItinRecognizer, _search(r"9\d{2}[- ]?[5-9]")),
        "US_PASSPORT": (pr.UsPassportRecognizer, _search(r"\d{8}")),
        "UUID": (pr.UuidRecognizer, _search(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}")),
    }
    return [
        _presidio_check(entity, make(), entity, maybe, windowed.get(entity))
        for entity, (make, maybe) in table.items() if entity in entities
    ]


# ---------------------------------------------------------------------------- the scanner


def resolve_overlaps(found: list[Entity]) -> list[Entity]:
    """Non-overlapping, sorted by start: on overlap the higher priority wins, then score, then length."""
    ranked = sorted(found, key=lambda e: (-_PRIORITY.get(e.type, 0), -e.score, e.start - e.end, e.start))
    kept: list[Entity] = []
    for entity in ranked:
        if all(entity.end <= k.start or k.end <= entity.start for k in kept):
            kept.append(entity)
    kept.sort(key=lambda e: e.start)
    return kept


class PiiScanner:
    """PII and secrets in a text, by pattern, in well under a millisecond per KB (sync: call it inline).

    `entities`: the types to look for (default: `PATTERN_ENTITIES`); secret types among them are looked
    for only with `secrets=True`, and all of them when `entities` is None. Raises `GuardrailsNotInstalled`
    without Presidio, and ValueError for a type it cannot find (NER types included).
    """

    def __init__(
        self, entities: Collection[str] | None = None, *, score_threshold: float = 0.4, secrets: bool = True,
    ) -> None:
        if entities is None:
            wanted = set(PATTERN_ENTITIES) | (set(SECRET_TYPES) if secrets else set())
        else:
            wanted = set(entities)
            unknown = wanted - SUPPORTED_ENTITIES
            if unknown:
                ner = sorted(unknown & NER_ENTITIES)
                raise ValueError(
                    f"cannot find entity types {sorted(unknown)}"
                    + (f" ({', '.join(ner)} need an NER model, which Keel does not run)" if ner else "")
                    + f"; supported: {', '.join(sorted(SUPPORTED_ENTITIES))}"
                )
            if not secrets:
                wanted -= SECRET_TYPES
        self.entity_types: frozenset[str] = frozenset(wanted)
        self.score_threshold = score_threshold
        checks = _presidio_checks(wanted)  # first: a missing Presidio fails here, whatever was asked
        if CREDIT_CARD in wanted:
            checks.append(Check(CREDIT_CARD, frozenset({CREDIT_CARD}), _search(r"\d(?:[ \-]?\d){11}"), find_cards))
        if PHONE_NUMBER in wanted:
            checks.append(Check(PHONE_NUMBER, frozenset({PHONE_NUMBER}), _DIGIT_RUN_7.search, find_phones))
        if wanted & SECRET_TYPES:
            checks.append(Check("secrets", frozenset(wanted & SECRET_TYPES), lambda _: True, find_secrets))
        self.checks: tuple[Check, ...] = tuple(checks)

    def scan(self, text: str) -> list[Entity]:
        """Sorted, non-overlapping entities of the chosen types scoring at least the threshold."""
        found = [
            Entity(type_, start, end, score)
            for check in self.checks
            for type_, start, end, score in check.run(text)
            if score >= self.score_threshold and type_ in self.entity_types
        ]
        if len(found) < 2:
            return found
        return resolve_overlaps(found)
