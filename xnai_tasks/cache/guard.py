"""The guard of the semantic cache: may the answer to an earlier request serve this one?

A lookup embeds the new request's text (:mod:`xnai_tasks.cache.request`) with the worker's encoder
(all-MiniLM-L6-v2) and compares it with earlier requests of the same role, task, model and other
arguments. Cosine similarity alone cannot decide: the encoder places "start a worker" next to "stop a
worker", "7B" next to "70B" and "should" next to "should not" (closer, on average, than two wordings of
one question). So the similarity only says the two requests are about the same thing; the wording decides
whether they ask the same thing. A false hit serves a wrong answer, a false miss costs one generation:
in doubt, the guard refuses. Its rules, in order (the first that fires refuses):

1. **Similarity**: below :data:`MIN_COSINE` the requests are about different things.
2. **Literals**: numbers (digits or number words: "8-core" is "eight-core"), quoted text and identifiers
   (``acks_late``, ``os.path``) must be the same on both sides: they are the values a request is about.
3. **Negation**: the same number of negation words (not, never, without, n't...) on both sides.
4. **Swapped roles**: two words trading places around the same connecting words ("X than Y" and
   "Y than X", "X to Y" and "Y to X") ask the opposite question.
5. **Opposites by prefix**: a word only one side has that is another word of the other side with its
   prefix changed (advantage/disadvantage, increase/decrease, encrypt/decrypt, ascending/descending).
6. **Edited in place**: when the content words are the same sentence with some words exchanged (no word
   added or dropped) and the kept words are at least as many as the exchanged ones, the asker edited the
   request, and an edit is a different request (string/list, start/stop, adds/multiplies). A rephrasing
   reorganises the sentence instead: words added, dropped or moved, or most words new.

Words are compared by :mod:`xnai_tasks.cache.wording` (lower case, light stems, number words as digits;
a word that is a prefix of at least 4 letters of a word on the other side counts as that word: "dict" and
"dictionary"). None of the rules names a word of a particular request. Measured with
``xnai cache eval``: README, Semantic cache guard.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from xnai_tasks.cache.request import Request
from xnai_tasks.cache.wording import Wording, wording
from xnai_tasks.models.inference import cosine

#: Cosine similarity (all-MiniLM-L6-v2) below which two requests are about different things. On the
#: evaluation file, wordings of one request score 0.67-0.98; the wording rules, not this, refuse near misses.
MIN_COSINE: Final = 0.72
#: Longest run of connecting words rule 4 looks across ("faster than", "to").
SWAP_SPAN: Final = 4
#: Longest prefix rule 5 treats as an opposite-making prefix (dis-, de-, en-, up-/down-).
OPPOSITE_PREFIX: Final = 4
#: Shortest shared ending for rule 5, and shortest word taken as an abbreviation of a longer one.
MIN_STEM: Final = 4


@dataclass(frozen=True, kw_only=True)
class Decision:
    """Whether the earlier answer may serve the new request, the cosine similarity, and why (one line)."""

    hit: bool
    score: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"hit": self.hit, "score": round(self.score, 4), "reason": self.reason}


@dataclass(frozen=True, kw_only=True)
class Embedded:
    """A request and the encoder's vector of its text."""

    request: Request
    vector: Sequence[float]


def decide(earlier: Embedded, new: Embedded) -> Decision:
    """May the answer to ``earlier`` serve ``new``? The one decision every semantic lookup makes."""
    score = cosine(earlier.vector, new.vector)
    if earlier.request.scope != new.request.scope:
        return Decision(hit=False, score=score, reason="another task or other arguments")
    if earlier.request.text.casefold() == new.request.text.casefold():
        return Decision(hit=True, score=score, reason="the same text")
    if score < MIN_COSINE:
        return Decision(hit=False, score=score, reason=f"similarity {score:.3f} below {MIN_COSINE}")
    refusal = wording_refusal(earlier.request.text, new.request.text)
    if refusal is not None:
        return Decision(hit=False, score=score, reason=refusal)
    return Decision(hit=True, score=score, reason=f"similarity {score:.3f}, same literals and structure")


def lookup(new: Embedded, earlier: Sequence[Embedded]) -> tuple[int | None, Decision | None]:
    """The earlier request whose answer serves ``new`` (its index and the decision), the most similar first.

    With no hit, the index is None and the decision is the one about the most similar candidate (None
    when there is no candidate).
    """
    order = sorted(range(len(earlier)), key=lambda i: (-cosine(earlier[i].vector, new.vector), i))
    first: Decision | None = None
    for index in order:  # the wording rules run only until the first hit
        decision = decide(earlier[index], new)
        if decision.hit:
            return index, decision
        first = first or decision
    return None, first


def wording_refusal(a: str, b: str) -> str | None:
    """Why the wordings of ``a`` and ``b`` ask different things (rules 2-6), or None."""
    wa, wb = _merge_abbreviations(wording(a), wording(b))
    for rule in _RULES:
        reason = rule(wa, wb)
        if reason is not None:
            return reason
    return None


def _literals(a: Wording, b: Wording) -> str | None:
    for name, left, right in (
        ("numbers", a.numbers, b.numbers),
        ("quoted text", a.quoted, b.quoted),
        ("identifiers", a.identifiers, b.identifiers),
    ):
        if left != right:
            return f"{name} differ: {_show(left)} vs {_show(right)}"
    return None


def _negation(a: Wording, b: Wording) -> str | None:
    if a.negations != b.negations:
        return f"negation differs: {a.negations} vs {b.negations} negation word(s)"
    return None


def _swapped(a: Wording, b: Wording) -> str | None:
    shared = set(a.content) & set(b.content)
    text_b = " " + " ".join(b.words) + " "
    for i, first in enumerate(a.words):
        if first not in shared:
            continue
        for j in range(i + 1, min(len(a.words), i + SWAP_SPAN + 2)):
            second = a.words[j]
            if second in shared and second != first:
                flipped = " ".join([second, *a.words[i + 1 : j], first])
                if f" {flipped} " in text_b:
                    return f"swapped roles: {first!r} and {second!r} trade places"
    return None


def _opposites(a: Wording, b: Wording) -> str | None:
    only_a = set(a.content) - set(b.content)
    only_b = set(b.content) - set(a.content)
    for x in sorted(only_a):
        for y in sorted(only_b):
            if _prefix_opposites(x, y):
                return f"opposites: {x!r} vs {y!r}"
    return None


def _edited(a: Wording, b: Wording) -> str | None:
    matcher = difflib.SequenceMatcher(a=a.content, b=b.content, autojunk=False)
    changes = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    if not changes or any(op[0] != "replace" for op in changes):
        return None
    kept = sum(block.size for block in matcher.get_matching_blocks())
    exchanged = max(sum(i2 - i1 for _, i1, i2, _, _ in changes), sum(j2 - j1 for _, _, _, j1, j2 in changes))
    if kept < exchanged:
        return None
    edits = ", ".join(
        f"{' '.join(a.content[i1:i2])!r} -> {' '.join(b.content[j1:j2])!r}" for _, i1, i2, j1, j2 in changes
    )
    return f"edited in place: {edits}"


_RULES: Final[tuple[Callable[[Wording, Wording], str | None], ...]] = (
    _literals,
    _negation,
    _swapped,
    _opposites,
    _edited,
)


def _prefix_opposites(x: str, y: str) -> bool:
    """``x`` and ``y`` share an ending of :data:`MIN_STEM`+ letters and differ only in short prefixes."""
    shared = 0
    while shared < min(len(x), len(y)) and x[-1 - shared] == y[-1 - shared]:
        shared += 1
    return shared >= MIN_STEM and max(len(x), len(y)) - shared <= OPPOSITE_PREFIX


def _merge_abbreviations(a: Wording, b: Wording) -> tuple[Wording, Wording]:
    """Both wordings with each word that starts with a shorter word of either side (4+ letters) as that word."""
    vocabulary = sorted(set(a.content) | set(b.content), key=len)

    def short(word: str) -> str:
        for candidate in vocabulary:
            if len(candidate) >= MIN_STEM and word != candidate and word.startswith(candidate):
                return candidate
        return word

    def merged(w: Wording) -> Wording:
        content = {word: short(word) for word in w.content}
        return Wording(
            words=tuple(content.get(word, word) for word in w.words),
            content=tuple(content[word] for word in w.content),
            numbers=w.numbers,
            quoted=w.quoted,
            identifiers=w.identifiers,
            negations=w.negations,
        )

    return merged(a), merged(b)


def _show(values: Sequence[str]) -> str:
    return "[" + ", ".join(values) + "]" if values else "none"
