"""Grok: long-form synthesis and structured trade-off analysis.

Grok holds the LLM and the encoder. When the LLM cannot be loaded (over the RAM budget in lazy mode,
or missing), while the role's circuit breaker for it is open, when no lease on it frees in time, or when a
call fails, ``analyze`` and ``synthesize`` (given a context) degrade to an encoder-only extractive answer
marked ``degraded: true`` with the reason, instead of failing (README, Models and Reliability).
"""

from __future__ import annotations

import os
from typing import Any

from xnai_tasks.errors import ModelError, RefusedError, UsageError
from xnai_tasks.models import inference as m
from xnai_tasks.models.loading import LLM
from xnai_tasks.worker import prompts
from xnai_tasks.worker import startup as runtime
from xnai_tasks.worker.arguments import optional_text, require_count, require_text
from xnai_tasks.worker.llm import llm_blocked, run_llm
from xnai_tasks.worker.role_task import RoleTask, register_diagnostics, role_task
from xnai_tasks.worker.sentences import sentences
from xnai_tasks.worker.timer import Timer

ROLE = "grok"
SYNTHESIZE_MAX_TOKENS = 256
ANALYZE_MAX_TOKENS = 96
MAX_TOKENS_LIMIT = 2048
#: Sentences an extractive (degraded) answer keeps.
EXTRACT_SENTENCES = 3
#: An LLM sentence in an assessment is kept only if some evidence sentence is at least this similar to it
#: (all-MiniLM-L6-v2 cosine): what the small model adds beyond the evidence is dropped, and counted.
SUPPORT_MIN = 0.5
#: Answering from evidence: less sampling noise, one paragraph.
GROUNDED_TEMPERATURE = 0.3
PARAGRAPH_STOP = ["\n\n", "\nQuestion:", "\nFacts:", "\nNotes:"]

register_diagnostics(ROLE)


def _llm_unavailable(timer: Timer) -> str | None:
    """None when the LLM may be used (loading it now if needed), else why not: its breaker is open, or no load."""
    blocked = llm_blocked(ROLE)
    if blocked is not None:
        return blocked
    holder = runtime.registry(ROLE).llm
    if holder.loaded:
        return None
    try:
        with timer.phase("load"):
            holder.load()
    except (RefusedError, ModelError) as exc:
        return str(exc)
    return None


def _embed(texts: list[str], timer: Timer) -> list[list[float]]:
    holder = runtime.registry(ROLE).encoder
    with runtime.using(holder, timer) as encoder, timer.phase("embed"):
        return m.embed(encoder, texts)


def _extract(query: str, text: str, timer: Timer, n: int = EXTRACT_SENTENCES) -> list[dict[str, Any]]:
    """The ``n`` sentences of ``text`` closest to ``query``, in their original order, with scores."""
    found = sentences(text)
    if not found:
        return []
    vectors = _embed([query, *found], timer)
    scored = [(m.cosine(vectors[0], v), i) for i, v in enumerate(vectors[1:])]
    keep = sorted(i for _, i in sorted(scored, reverse=True)[:n])
    score = {i: s for s, i in scored}
    return [{"sentence": found[i], "score": round(score[i], 4)} for i in keep]


@role_task(ROLE)
def synthesize(
    self: RoleTask,
    prompt: str,
    context: str | None = None,
    max_tokens: int = SYNTHESIZE_MAX_TOKENS,
    temperature: float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """A long-form answer to ``prompt`` (grounded in ``context`` if given); extractive when the LLM is out."""
    question = require_text("prompt", prompt, max_chars=20_000)
    background = optional_text("context", context)
    limit = require_count("max_tokens", max_tokens, 1, MAX_TOKENS_LIMIT)
    timer = Timer()
    reason = _llm_unavailable(timer)
    if reason is not None:
        return _extractive(question, background, reason, timer)
    holder = runtime.registry(ROLE).llm
    notes = None if background is None else f"Notes: {background.strip()}"

    def use(llm: LLM) -> m.Generation:
        default = float(llm.defaults.get("temperature", 0.7)) if notes is None else GROUNDED_TEMPERATURE
        temp = default if temperature is None else float(temperature)
        stop = None if notes is None else ["\nQuestion:"]
        return m.generate(llm, question, limit, temp, seed=seed, system=notes, stop=stop, preamble=prompts.SYNTHESIS)

    try:
        out = run_llm(ROLE, timer, use)
    except (RefusedError, ModelError) as exc:  # the breaker has counted it; the context can still answer
        return _extractive(question, background, str(exc), timer)
    text = out["text"].removeprefix("Answer:").strip()
    return {"prompt": question, "text": text, "grounded": notes is not None, "degraded": False} | (
        runtime.generation_report(holder, out, timer)
    )


def _extractive(question: str, background: str | None, reason: str, timer: Timer) -> dict[str, Any]:
    """The answer without the LLM: the context's sentences closest to the question, marked degraded."""
    if background is None:
        raise RefusedError(f"the LLM is unavailable and there is no context to extract from: {reason}")
    picked = _extract(question, background, timer)
    return {
        "model": runtime.registry(ROLE).encoder.model.name,
        "pid": os.getpid(),
        "prompt": question,
        "text": " ".join(p["sentence"] for p in picked),
        "evidence": picked,
        "degraded": True,
        "degraded_reason": reason,
        "completion_tokens": 0,
        "timings": timer.as_dict(),
    }


def _options(options: Any) -> list[tuple[str, str]]:
    """``options`` as (name, description) pairs: strings, or objects with "name" and an optional "description"."""
    if not isinstance(options, list) or not 2 <= len(options) <= 12:
        raise UsageError('options must be a list of 2 to 12 names or {"name", "description"} objects')
    pairs: list[tuple[str, str]] = []
    for i, option in enumerate(options):
        if isinstance(option, dict):
            name = require_text(f"options[{i}].name", option.get("name"), max_chars=200)
            description = optional_text(f"options[{i}].description", option.get("description")) or ""
        else:
            name, description = require_text(f"options[{i}]", option, max_chars=200), ""
        pairs.append((name.strip(), description.strip()))
    if len({name for name, _ in pairs}) != len(pairs):
        raise UsageError("options has the same name twice")
    return pairs


def _supported(text: str, evidence: list[str], timer: Timer) -> tuple[str, int]:
    """The sentences of ``text`` that some evidence sentence supports (:data:`SUPPORT_MIN`), and how many were not."""
    said = sentences(text)
    if not said or not evidence:
        return "", len(said)
    vectors = _embed([*said, *evidence], timer)
    kept = [
        sentence
        for sentence, vector in zip(said, vectors[: len(said)], strict=True)
        if max(m.cosine(vector, other) for other in vectors[len(said) :]) >= SUPPORT_MIN
    ]
    return " ".join(kept), len(said) - len(kept)


def _mentions(name: str, background: str | None) -> str:
    """The sentences of ``background`` that name ``name`` (case-insensitive): the bank's evidence about it."""
    if not background:
        return ""
    return " ".join(s for s in sentences(background) if name.lower() in s.lower())


def _assess(asked: str, name: str, facts: str, limit: int, seed: int | None, timer: Timer) -> tuple[str, int, int]:
    """The LLM's assessment of one option from its facts: kept sentences, sentences dropped, tokens used."""
    prompt = f"{asked} Using only the facts, give one advantage and one disadvantage of {name}."

    def use(llm: LLM) -> m.Generation:
        return m.generate(
            llm,
            prompt,
            limit,
            GROUNDED_TEMPERATURE,
            seed=seed,
            system=f"Facts: {facts}",
            stop=PARAGRAPH_STOP,
            preamble=prompts.ANALYSIS,
        )

    out = run_llm(ROLE, timer, use)
    kept, dropped = _supported(out["text"].removeprefix("Answer:"), sentences(facts), timer)
    return kept, dropped, out["completion_tokens"]


@role_task(ROLE)
def analyze(
    self: RoleTask,
    question: str,
    options: list[Any],
    context: str | None = None,
    max_tokens: int = ANALYZE_MAX_TOKENS,
    seed: int | None = None,
) -> dict[str, Any]:
    """A structured trade-off comparison of ``options`` for ``question``, from evidence.

    The evidence is each option's description and ``context`` (e.g. memory bank chunks). Each option gets a
    relevance score (encoder: cosine similarity of the option to the question), the evidence sentences that
    bear most on it, and an LLM assessment written from that evidence (``max_tokens`` each) of which only the
    sentences the evidence supports are kept. The recommendation is the most relevant option.
    """
    asked = require_text("question", question, max_chars=4000)
    pairs = _options(options)
    background = optional_text("context", context)
    limit = require_count("max_tokens", max_tokens, 1, 512)
    timer = Timer()
    described = [f"{name}: {description}" if description else name for name, description in pairs]
    vectors = _embed([asked, *described], timer)
    relevance = [m.cosine(vectors[0], v) for v in vectors[1:]]
    reason = _llm_unavailable(timer)
    rows: list[dict[str, Any]] = []
    tokens = unsupported = 0
    for (name, description), score in zip(pairs, relevance, strict=True):
        row: dict[str, Any] = {"name": name, "description": description, "relevance": round(score, 4)}
        facts = " ".join(part for part in (description, _mentions(name, background)) if part)
        row["evidence"] = _extract(f"{asked} {name}", facts, timer, 2) if facts else []
        extracted = " ".join(e["sentence"] for e in row["evidence"]) or None
        row["assessment"] = extracted
        if reason is None and facts:
            try:
                kept, dropped, used = _assess(asked, name, facts, limit, seed, timer)
            except (RefusedError, ModelError) as exc:  # this and the later options from their evidence
                reason = str(exc)
            else:
                tokens, unsupported = tokens + used, unsupported + dropped
                row["assessment"] = kept or extracted
        rows.append(row)
    ranked = sorted(rows, key=lambda r: r["relevance"], reverse=True)
    models = runtime.registry(ROLE)
    timings = timer.as_dict()
    return {
        "model": models.encoder.model.name if reason else models.llm.model.name,
        "pid": os.getpid(),
        "models": {"llm": None if reason else models.llm.model.name, "encoder": models.encoder.model.name},
        "question": asked,
        "options": rows,
        "ranking": [r["name"] for r in ranked],
        "recommendation": ranked[0]["name"],
        "method": "ranked by encoder similarity to the question"
        + (
            "; assessments are extracted evidence sentences (no LLM)"
            if reason
            else f"; assessments are LLM sentences the evidence supports (cosine >= {SUPPORT_MIN}), else evidence"
        ),
        "unsupported_sentences_dropped": unsupported,
        "degraded": reason is not None,
        "degraded_reason": reason,
        "completion_tokens": tokens,
        "timings": timings | {"tokens_per_s": round(tokens / max(timings.get("generate_s", 0.0), 1e-9), 1)},
    }
