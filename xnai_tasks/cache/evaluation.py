"""``xnai cache eval``: how the guard decides on pairs of requests known to be the same or not.

Each line of the file is ``{"a": TEXT, "b": TEXT, "same": BOOL}``. Both texts are taken as the prompt
of one task (``grok.synthesize``, nothing else differing), embedded with the workers' encoder, and ``b``
is looked up among the earlier requests ``[a]`` exactly as a live semantic lookup would
(:func:`xnai_tasks.cache.guard.lookup`). A hit on a ``same`` pair is a true hit, on another a false hit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from xnai_tasks.cache.encoder import cache_encoder, embed_texts
from xnai_tasks.cache.guard import MIN_COSINE, Decision, Embedded, lookup
from xnai_tasks.cache.request import request_text
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings

#: The development pairs shipped with the package (the default FILE).
DEFAULT_PAIRS: Final = Path(__file__).resolve().parent / "data" / "cache-dev.jsonl"
#: The task whose prompt each text of a pair is.
EVAL_ROLE: Final = "grok"
EVAL_TASK: Final = "synthesize"


@dataclass(frozen=True, kw_only=True)
class Pair:
    """Two requests and whether one's answer serves the other."""

    a: str
    b: str
    same: bool


def read_pairs(path: Path) -> list[Pair]:
    """The pairs of a JSON-lines file; a malformed line is a :class:`UsageError` naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    pairs: list[Pair] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{number}: not JSON") from None
        if not (isinstance(row, dict) and isinstance(row.get("a"), str) and isinstance(row.get("b"), str)) or not (
            isinstance(row.get("same"), bool)
        ):
            raise UsageError(f'{path}:{number}: expected {{"a": TEXT, "b": TEXT, "same": true|false}}')
        pairs.append(Pair(a=row["a"], b=row["b"], same=row["same"]))
    if not pairs:
        raise UsageError(f"{path} holds no pairs")
    return pairs


def decide_pair(pair: Pair, vector_a: list[float], vector_b: list[float]) -> Decision:
    """The decision of a live lookup of ``b`` after ``a`` was answered."""
    earlier = Embedded(request=request_text(EVAL_ROLE, EVAL_TASK, {"prompt": pair.a}), vector=vector_a)
    new = Embedded(request=request_text(EVAL_ROLE, EVAL_TASK, {"prompt": pair.b}), vector=vector_b)
    _, decision = lookup(new, [earlier])
    assert decision is not None  # one candidate: always a decision
    return decision


def evaluate(pairs: list[Pair], vectors: list[list[float]]) -> dict[str, Any]:
    """The report for ``pairs`` given the vectors of their texts (a0, b0, a1, b1, ...)."""
    rows: list[dict[str, Any]] = []
    for i, pair in enumerate(pairs):
        decision = decide_pair(pair, vectors[2 * i], vectors[2 * i + 1])
        rows.append({"a": pair.a, "b": pair.b, "same": pair.same} | decision.to_dict())
    positives = sum(pair.same for pair in pairs)
    return {
        "positives": positives,
        "negatives": len(pairs) - positives,
        "true_hits": sum(row["hit"] and row["same"] for row in rows),
        "false_hits": sum(row["hit"] and not row["same"] for row in rows),
        "min_cosine": MIN_COSINE,
        "pairs": rows,
    }


def run_eval(settings: Settings, path: Path) -> dict[str, Any]:
    """Read ``path``, embed every text with the workers' encoder, and evaluate the guard on it."""
    pairs = read_pairs(path)
    holder = cache_encoder(settings)
    try:
        texts = [request_text(EVAL_ROLE, EVAL_TASK, {"prompt": t}).text for pair in pairs for t in (pair.a, pair.b)]
        vectors = embed_texts(holder, texts)
    finally:
        holder.close()
    return {"file": str(path), "model": holder.model.name} | evaluate(pairs, vectors)


def format_eval(report: dict[str, Any]) -> str:
    """The report as text: one line per pair, then the totals."""
    lines = []
    for row in report["pairs"]:
        verdict = "hit " if row["hit"] else "miss"
        mark = "ok" if row["hit"] == row["same"] else "WRONG"
        lines.append(f"{verdict} {row['score']:.3f} {mark:5} {row['a']!r} / {row['b']!r}: {row['reason']}")
    lines.append(
        f"{report['true_hits']}/{report['positives']} same pairs hit, {report['false_hits']}/{report['negatives']} "
        f"different pairs hit (false hits); model {report['model']}, min cosine {report['min_cosine']}"
    )
    return "\n".join(lines)
