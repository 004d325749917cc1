"""Secrets in text: API keys, auth tokens, private keys, connection strings and passwords, by regex.

Each pattern is written so that it is recognisable early and stays matched from the same start as
the text grows (a stream's hold-back window relies on it, see `keel.guardrails.holdback`):

- a key with a fixed prefix matches once it has its vendor's minimum length (`sk-` and 20 more);
- a PEM private key matches from its BEGIN line: to its END line, or to the end of the text while
  the END line has not come yet (an unterminated key is still a key);
- a password or key in an assignment (`password = ...`, `"api_key": "..."`) is the value alone,
  from its sixth character.

The longest text any pattern needs before it matches is `LONGEST_PREFIX` characters (a PEM BEGIN
line): a hold-back window shorter than that could release the start of a key before it is known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

API_KEY: Final = "API_KEY"
AUTH_TOKEN: Final = "AUTH_TOKEN"
PRIVATE_KEY: Final = "PRIVATE_KEY"
CONNECTION_STRING: Final = "CONNECTION_STRING"
PASSWORD: Final = "PASSWORD"
SECRET_TYPES: Final = frozenset({API_KEY, AUTH_TOKEN, PRIVATE_KEY, CONNECTION_STRING, PASSWORD})

LONGEST_PREFIX: Final = 48  # "-----BEGIN ENCRYPTED PRIVATE KEY-----" and the like, with room


@dataclass(frozen=True, slots=True)
class SecretPattern:
    name: str
    type: str
    regex: re.Pattern[str]
    score: float
    needles: tuple[str, ...]  # the pattern runs only if one of these is in the text (lowered, if `lower`)
    lower: bool = False
    group: int = 0  # the part of the match that is the secret


def _p(
    name: str, type_: str, regex: str, needles: tuple[str, ...], score: float = 0.95, *, group: int = 0,
    flags: int = 0, lower: bool = False,
) -> SecretPattern:
    return SecretPattern(name, type_, re.compile(regex, flags), score, needles, lower, group)


PATTERNS: Final[tuple[SecretPattern, ...]] = (
    _p("PEM private key", PRIVATE_KEY,
       r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
       r"(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|.*\Z)",
       ("-----BEGIN",), 1.0, flags=re.DOTALL),
    _p("OpenAI/Anthropic-style key (sk-...)", API_KEY, r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-]{20,}", ("sk-",)),
    _p("Stripe key", API_KEY, r"(?<![A-Za-z0-9])(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}", ("_live_", "_test_")),
    _p("AWS access key id", API_KEY, r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}(?![0-9A-Z])",
       ("AKIA", "ASIA", "ABIA", "ACCA")),
    _p("GitHub token", API_KEY, r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})",
       ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    _p("GitLab token", API_KEY, r"(?<![A-Za-z0-9])glpat-[A-Za-z0-9_\-]{20,}", ("glpat-",)),
    _p("Google API key", API_KEY, r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_\-]{35}", ("AIza",)),
    _p("Slack token", API_KEY, r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9\-]{10,}", ("xox",)),
    _p("Hugging Face token", API_KEY, r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}", ("hf_",)),
    _p("JSON web token", AUTH_TOKEN,
       r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*", ("eyJ",)),
    _p("bearer token", AUTH_TOKEN, r"(?i:bearer)\s+([A-Za-z0-9\-._~+/]{16,}=*)", ("bearer",), 0.9, group=1,
       lower=True),
    _p("credentials in a URL", CONNECTION_STRING,
       r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{1,20}://[^\s:/@'\"<>]+:[^\s@/'\"<>]+@[^\s'\"<>]+", ("://",)),
    _p("key=value connection string", CONNECTION_STRING,
       r"(?i)(?<![A-Za-z0-9])(?:Server|Data Source|Host|DefaultEndpointsProtocol|Endpoint|AccountName)=[^;\s]+;"
       r"(?:[A-Za-z ]+=[^;]*;){0,8}?[A-Za-z ]*(?:Password|Pwd|AccountKey|SharedAccessKey)=[^;\s'\"]+;?",
       ("password=", "pwd=", "accountkey=", "sharedaccesskey="), lower=True),
    _p("AWS secret access key (with its name)", API_KEY,
       r"(?i:aws_secret_access_key)[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+=]{40})", ("aws_secret_access_key",),
       group=1, lower=True),
    _p("password assignment", PASSWORD,
       r"(?i)(?<![A-Za-z0-9])(?:password|passwd|pwd|passphrase)[\"']?\s*(?::|=|\bis\b)\s*[\"']?([^\s\"',;<>]{6,})",
       ("passw", "pwd", "passphrase"), 0.9, group=1, lower=True),
    _p("secret assignment", API_KEY,
       r"(?i)(?<![A-Za-z0-9])(?:api[_\-]?key|secret[_\-]?key|client[_\-]?secret|access[_\-]?token|auth[_\-]?token|secret)"
       r"[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9_\-./+=]{12,})", ("key", "secret", "token"), 0.85, group=1, lower=True),
)


def find_secrets(text: str) -> list[tuple[str, int, int, float]]:
    """(type, start, end, score) of every secret pattern's match; may overlap (the scanner merges).

    A pattern's regex runs only when one of its needles is in the text: clean text costs a few
    substring searches, no regex at all."""
    lowered: str | None = None
    found: list[tuple[str, int, int, float]] = []
    for pattern in PATTERNS:
        if pattern.lower:
            if lowered is None:
                lowered = text.lower()
            haystack = lowered
        else:
            haystack = text
        if not any(needle in haystack for needle in pattern.needles):
            continue
        for match in pattern.regex.finditer(text):
            start, end = match.span(pattern.group)
            if end > start:
                found.append((pattern.type, start, end, pattern.score))
    return found
