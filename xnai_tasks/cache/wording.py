"""The wording of a request as the cache guard reads it: words, content words, literals and negations.

Deliberately plain: lower case, a light suffix stripper (plurals, -ing, -ed) so "reverses" and "reverse"
are one word, number words as digits ("eight-core" and "8-core" say the same number), negative contractions
as two words ("can't" is "can not"), and no word lists beyond English function words, negation words and the
verbs that open a request ("Explain ...").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


#: Function words: they carry grammar, not what is asked.
STOP_WORDS: Final = _word_set(
    """a an the of to in into on onto for with by at from as and or but if then than that this these those it its
    is are was were be been being do does did doing done have has had having i me my we our us you your he she
    they them their what which who whom whose when where why how can could should would will shall may might must
    there here about between versus vs via per so such some any each every all both more most other own same very
    just also please"""
)
#: Verbs that frame a request when they open it ("Explain how ...", "Write a ..."): not what is asked about.
#: Only the first word counts: "reverses a list" keeps "list".
FRAMING_VERBS: Final = _word_set(
    "explain describe summarize summarise tell show give provide list name write create make document"
)
NEGATIONS: Final = _word_set("not no never without nor neither none nothing nobody cannot")
_UNITS: Final = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
)
NUMBER_WORDS: Final = {word: str(value) for value, word in enumerate(_UNITS.split())} | {
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "hundred": "100",
    "thousand": "1000",
    "million": "1000000",
}

_QUOTED = re.compile(r"""(?<!\w)(['"`])(.+?)\1(?!\w)""")
_TOKEN = re.compile(r"[a-z0-9_]+(?:[.'][a-z0-9_]+)*")
_DIGITS = re.compile(r"\d+(?:\.\d+)?")
_IDENTIFIER = re.compile(r"\w*_\w*|[a-z0-9]{2,}(?:\.[a-z0-9]{2,})+")
_CONTRACTIONS = re.compile(r"\b(can|won|shan)'t\b|n't\b")
_IRREGULAR = {"can": "can not", "won": "will not", "shan": "shall not"}


def _expand(match: re.Match[str]) -> str:
    """A negative contraction as two words: "can't" is "can not", "doesn't" "does not"."""
    return _IRREGULAR[match.group(1)] if match.group(1) else " not"


@dataclass(frozen=True, kw_only=True)
class Wording:
    """One request's words, normalised (see the module docstring)."""

    #: Every word in order, function words included (for "X than Y" against "Y than X").
    words: tuple[str, ...]
    #: The words that say what is asked, in order.
    content: tuple[str, ...]
    #: Numbers (digits and number words), quoted text and identifiers (acks_late, os.path), each sorted.
    numbers: tuple[str, ...]
    quoted: tuple[str, ...]
    identifiers: tuple[str, ...]
    #: How many negation words (not, never, without, n't...).
    negations: int


def stem(word: str) -> str:
    """A light stem: plural -s/-es/-ies and -ing/-ed off, long enough stems only."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


def wording(text: str) -> Wording:
    """The wording of ``text``."""
    quoted = sorted(match.group(2).strip().lower() for match in _QUOTED.finditer(text))
    tokens = _TOKEN.findall(_CONTRACTIONS.sub(_expand, text.lower().replace("\u2019", "'")))
    words: list[str] = []
    content: list[str] = []
    numbers: list[str] = []
    negations = 0
    for position, raw in enumerate(tokens):
        token = raw.removesuffix("'s")
        if token in NEGATIONS:
            negations += 1
            continue
        if token in NUMBER_WORDS:
            token = NUMBER_WORDS[token]
        numbers += _DIGITS.findall(token)
        plain = token in STOP_WORDS or (position == 0 and token in FRAMING_VERBS) or _DIGITS.fullmatch(token)
        word = token if plain else stem(token)
        words.append(word)
        if not plain:
            content.append(word)
    return Wording(
        words=tuple(words),
        content=tuple(content),
        numbers=tuple(sorted(numbers)),
        quoted=tuple(quoted),
        identifiers=tuple(sorted(t for t in tokens if _IDENTIFIER.fullmatch(t))),
        negations=negations,
    )
