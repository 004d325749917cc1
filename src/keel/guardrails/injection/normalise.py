"""Layer 1: normalisation. One pass turns a text into the form the other layers read, and reports what
it had to undo (the reasons are names, never the text).

- Unicode NFKC (fullwidth, mathematical alphanumerics, ligatures fold to plain letters);
- invisible characters removed: zero-width (U+200B-U+200D, U+2060, U+FEFF, U+180E, soft hyphen) and
  bidi controls (U+202A-U+202E, U+2066-U+2069, U+200E/U+200F, U+061C);
- hidden channels decoded: Unicode tag characters (U+E0020-U+E007E, "ASCII smuggling") and bytes hidden in
  variation selectors (U+FE00-U+FE0F, U+E0100-U+E01EF);
- homoglyphs folded: Cyrillic/Greek look-alike letters inside a word that also has Latin letters;
- payloads decoded into extra *views*: base64 (standard and URL-safe), hex, percent-encoding, ROT13.

The patterns layer then reads the normalised text and every decoded view. This layer's own score only
says how much obfuscation was undone; an encoded payload on its own is common in benign text (tokens,
images, hashes) and scores low.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

ZERO_WIDTH: Final = "\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad"
BIDI_STRONG: Final = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"  # embeddings, overrides, isolates
BIDI_MARKS: Final = "\u200e\u200f\u061c"  # common in right-to-left text: stripped, scored low

_INVISIBLE = re.compile(f"[{ZERO_WIDTH}{BIDI_STRONG}{BIDI_MARKS}]")
_ZW_IN_WORD = re.compile(f"[A-Za-z][{ZERO_WIDTH}]+[A-Za-z]")
_BIDI_STRONG = re.compile(f"[{BIDI_STRONG}]")
_TAGS = re.compile("[\U000e0000-\U000e007f]+")
_VARIATION = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]{8,}")
_NON_ASCII_WORD = re.compile(r"(?<!\w)\w*[^\x00-\x7f]\w*")
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])(?:[A-Za-z0-9+/]{16,}={0,2}|[A-Za-z0-9_-]{16,}={0,2})(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"(?<![0-9A-Za-z])(?:(?:0x|\\x)?[0-9A-Fa-f]{2}[\s:,]?){8,}")
_PERCENT = re.compile(r"(?:%[0-9A-Fa-f]{2}){4,}")
# ROT13 of common English and injection words ("the", "and", "you", "ignore", "previous", ...): two or more
# of them and the text gets a ROT13 view.
_ROT13_HINT = re.compile(
    r"\b(?:gur|naq|lbh|lbhe|vtaber|cerivbhf|vafgehpgvbaf|cebzcg|flfgrz|ehyrf|cergraq|sbetrg|qvfertneq|abj|nyy|erirny|frperg|cnffjbeq)\b",
    re.IGNORECASE,
)
_STYLED = re.compile("[\U0001d400-\U0001d7ff\uff01-\uff5e\u24b6-\u24e9\U0001f130-\U0001f189]")

# Look-alike letters folded to Latin when they sit in a word that also has Latin letters (real Cyrillic or
# Greek words are left alone). From Unicode's confusables.txt, the common single-letter cases.
HOMOGLYPHS: Final[dict[str, str]] = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "ѕ": "s", "і": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "У": "Y", "Х": "X", "Ѕ": "S", "І": "I", "Ј": "J", "Ԁ": "D", "Ԛ": "Q", "Ԝ": "W", "Һ": "H", "Ӏ": "I",
    # Greek
    "α": "a", "ο": "o", "ν": "v", "ρ": "p", "τ": "t", "υ": "u", "ι": "i", "κ": "k", "ε": "e",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    # Latin look-alikes outside ASCII (folded; not counted: they occur in real words, e.g. Turkish ı)
    "ı": "i", "ɑ": "a", "ɡ": "g", "ℓ": "l", "ǀ": "l",
}
_NOT_COUNTED: Final = frozenset("ıɑɡℓǀ")
_FOLD = str.maketrans(HOMOGLYPHS)

# This layer's score for what it undid (noisy-or over the reasons found).
WEIGHTS: Final[dict[str, float]] = {
    "tag characters": 0.9,  # text hidden in invisible Unicode tags: no benign use beyond flag emoji
    "variation-selector payload": 0.8,
    "homoglyphs": 0.6,
    "bidi controls": 0.5,
    "zero-width characters": 0.4,
    "styled characters": 0.2,
    "base64 payload": 0.25,
    "hex payload": 0.2,
    "percent-encoded payload": 0.15,
    "rot13 payload": 0.3,
    "bidi marks": 0.05,
}
MAX_PAYLOADS: Final = 8  # decoded views per text, at most (bounds the work on adversarial input)


@dataclass(frozen=True, slots=True)
class Normalised:
    """A text as the detectors read it: `text` (folded, invisible characters removed), the decoded
    payloads as `views` ((kind, text) pairs), and `reasons`/`score` for what was undone."""

    text: str
    views: tuple[tuple[str, str], ...]
    reasons: tuple[str, ...]
    score: float


def noisy_or(weights: list[float]) -> float:
    p = 1.0
    for w in weights:
        p *= 1.0 - w
    return 1.0 - p


def _readable(data: bytes, *, min_chars: int = 6) -> str | None:
    """`data` as text if it decodes as UTF-8 and reads like language (letters and spaces mostly)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text) < min_chars:
        return None
    printable = sum(ch.isprintable() or ch in "\n\t\r" for ch in text)
    wordy = sum(ch.isalpha() or ch == " " for ch in text)
    if printable < 0.95 * len(text) or wordy < 0.6 * len(text) or " " not in text.strip():
        return None
    return text


def _decode_base64(token: str) -> str | None:
    if token.isalpha() and (token.islower() or token.isupper()):
        return None  # one long word, not base64
    raw = token.rstrip("=")
    padded = raw + "=" * (-len(raw) % 4)
    try:
        if "-" in raw or "_" in raw:
            data = base64.urlsafe_b64decode(padded)
        else:
            data = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return _readable(data)


def _decode_hex(token: str) -> str | None:
    digits = re.sub(r"0x|\\x|[\s:,]", "", token)
    if len(digits) % 2:
        digits = digits[:-1]
    try:
        return _readable(bytes.fromhex(digits))
    except ValueError:
        return None


def _variation_bytes(run: str) -> str | None:
    out = bytearray()
    for ch in run:
        cp = ord(ch)
        out.append(cp - 0xFE00 if cp <= 0xFE0F else cp - 0xE0100 + 16)
    return _readable(bytes(out), min_chars=4)


def normalise(text: str) -> Normalised:
    reasons: list[str] = []
    views: list[tuple[str, str]] = []

    if not text.isascii():
        # Hidden channels first: they vanish under NFKC and the invisible-character strip.
        for run in _TAGS.findall(text):
            hidden = "".join(chr(ord(ch) - 0xE0000) for ch in run if 0xE0020 <= ord(ch) <= 0xE007E)
            if len(hidden) >= 4:  # flag emoji use a few tags (England: "gbeng")
                views.append(("tag characters", hidden))
                reasons.append("tag characters")
        for run in _VARIATION.findall(text):
            decoded = _variation_bytes(run)
            if decoded:
                views.append(("variation selectors", decoded))
                reasons.append("variation-selector payload")
        if _ZW_IN_WORD.search(text):
            reasons.append("zero-width characters")
        if _BIDI_STRONG.search(text):
            reasons.append("bidi controls")
        elif any(ch in text for ch in BIDI_MARKS):
            reasons.append("bidi marks")
        text = _TAGS.sub("", text)
        text = _VARIATION.sub("", text)
        text = _INVISIBLE.sub("", text)
        if len(_STYLED.findall(text)) >= 8:
            reasons.append("styled characters")
        text = unicodedata.normalize("NFKC", text)
        if not text.isascii():
            counted = 0

            def fold(match: re.Match[str]) -> str:
                nonlocal counted
                word = match.group(0)
                folded = word.translate(_FOLD)
                if folded != word and any("a" <= c.lower() <= "z" for c in word):
                    if any(c in HOMOGLYPHS and c not in _NOT_COUNTED for c in word):
                        counted += 1
                    return folded
                return word

            text = _NON_ASCII_WORD.sub(fold, text)
            if counted:
                reasons.append("homoglyphs")

    # Encoded payloads: decoded into views that the patterns layer reads too.
    if len(text) >= 16:
        for match in _BASE64.finditer(text):
            if len(views) >= MAX_PAYLOADS:
                break
            decoded = _decode_base64(match.group(0))
            if decoded:
                views.append(("base64", decoded))
                if "base64 payload" not in reasons:
                    reasons.append("base64 payload")
        for match in _HEX.finditer(text):
            if len(views) >= MAX_PAYLOADS:
                break
            decoded = _decode_hex(match.group(0))
            if decoded:
                views.append(("hex", decoded))
                if "hex payload" not in reasons:
                    reasons.append("hex payload")
        if "%" in text:
            for match in _PERCENT.finditer(text):
                if len(views) >= MAX_PAYLOADS:
                    break
                decoded = _readable(unquote(match.group(0)).encode("utf-8", "replace"), min_chars=4)
                if decoded:
                    views.append(("percent-encoding", decoded))
                    if "percent-encoded payload" not in reasons:
                        reasons.append("percent-encoded payload")
        hints = _ROT13_HINT.findall(text)
        if len(hints) >= 2 and len(views) < MAX_PAYLOADS:
            views.append(("rot13", codecs.encode(text, "rot13")))
            reasons.append("rot13 payload")

    score = noisy_or([WEIGHTS[r] for r in reasons])
    return Normalised(text, tuple(views), tuple(reasons), round(score, 4))
