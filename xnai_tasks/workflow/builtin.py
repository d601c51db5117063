"""The built-in workflows: ``research``, ``code`` and ``review``.

Each is an ``async def`` of a run (:class:`~xnai_tasks.workflow.ledger.Steps`) that awaits only the run's
``step`` and ``parallel``: the same decisions whether the sync client or the async one runs it.
"""

from __future__ import annotations

from typing import Any

from xnai_tasks.client.grounding import MIN_SCORE
from xnai_tasks.errors import UsageError
from xnai_tasks.worker.code import validate_code
from xnai_tasks.workflow.ledger import StepRecord, Steps, judge
from xnai_tasks.workflow.provenance import summary
from xnai_tasks.workflow.spec import Step

SEARCH_TIMEOUT_S = 60.0
LLM_TIMEOUT_S = 300.0
INDEX_TIMEOUT_S = 120.0


def _relevant(found: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [hit for hit in (found or {}).get("hits", []) if hit["score"] >= MIN_SCORE]


async def research(run: Steps, topic: str, k: int = 4, max_tokens: int = 128, seed: int = 1) -> dict[str, Any]:
    """curation searches the bank, grok answers from the hits, cline writes it up, curation indexes the write-up."""
    hits = _relevant(await run.step("search", "curation", "search", timeout_s=SEARCH_TIMEOUT_S, query=topic, k=k))
    if not hits:
        run.remark("no chunk of the bank is relevant: grok answers without notes")
    notes = "\n".join(hit["chunk"] for hit in hits) or None
    answer = await run.step(
        "synthesize", "grok", "synthesize", timeout_s=LLM_TIMEOUT_S,
        prompt=topic, context=notes, max_tokens=max_tokens, seed=seed,
    )  # fmt: skip
    assert answer is not None  # a required step returns its result or raises
    if answer.get("degraded"):
        run.remark(f"grok's answer is degraded (extracted from the notes): {answer.get('degraded_reason')}")
    writeup = await run.step(
        "document", "cline", "generate_docs", timeout_s=LLM_TIMEOUT_S, optional=True,
        topic=topic, context=answer["text"] or notes, max_tokens=max_tokens, seed=seed,
    )  # fmt: skip
    source = "document" if writeup and writeup.get("text", "").strip() else "synthesize"
    if source == "synthesize":
        run.remark("cline wrote nothing: grok's answer is indexed instead")
    elif writeup and writeup.get("degraded"):
        run.remark(f"cline's write-up is degraded (from the notes): {writeup.get('degraded_reason')}")
    chosen = writeup if source == "document" else answer
    text = str(chosen["text"]).strip() if chosen else ""
    indexed = await _index(run, source, text)
    return {
        "topic": topic,
        "answer": answer["text"],
        "writeup": text,
        "sources": [{"id": hit["id"], "score": hit["score"]} for hit in hits],
        "degraded": bool(answer.get("degraded") or (writeup or {}).get("degraded")),
        "indexed_as": indexed,
        "provenance": summary(run.provenance(source)),
        "remarks": run.remarks,
    }


async def _index(run: Steps, source: str, text: str) -> str | None:
    """Index ``text`` with the provenance of step ``source``; its document id, or None if it was not indexed."""
    if not text.strip():
        run.remark("nothing to index: the answer is empty")
        return None
    doc_id = f"workflow:{run.id}"
    document = {"id": doc_id, "text": text, "provenance": run.provenance(source)}
    done = await run.step("index", "curation", "index", timeout_s=INDEX_TIMEOUT_S, optional=True, documents=[document])
    return doc_id if done is not None else None


async def code(
    run: Steps,
    spec: str,
    language: str = "python",
    max_retries: int = 2,
    first_attempt: str | None = None,
    max_tokens: int = 128,
    seed: int = 1,
) -> dict[str, Any]:
    """cline writes code; each invalid version is retried with its error (at most ``max_retries``); grok reviews."""
    version = _draft(run, first_attempt, language)
    tries, calls = 0, max_retries + (1 if version is None else 0)  # a given draft stands for the first attempt
    while (version is None or version["validation"].get("valid") is False) and tries < calls:
        error = None if version is None else version["validation"].get("error")
        wanted = spec if error is None else f"{spec}. An earlier version was rejected ({error}); write valid {language}"
        version = await run.step(
            f"generate-{tries + 1}", "cline", "generate_code", timeout_s=LLM_TIMEOUT_S,
            spec=wanted, language=language, max_tokens=max_tokens, seed=seed + tries,
        )  # fmt: skip
        tries += 1
    if version is None:  # no draft and max_retries < 0
        raise UsageError("max_retries must be at least 0")
    error = version["validation"].get("error")
    valid = version["validation"].get("valid")
    if valid is False:
        run.remark(f"no valid version after {tries} attempt(s): the last one is reviewed ({error})")
    review = await _review_code(run, spec, language, str(version["code"]), seed)
    return {
        "spec": spec,
        "language": language,
        "code": version["code"],
        "valid": valid,
        "error": error if valid is False else None,
        "cline_attempts": tries,
        "review": None if review is None else review["text"],
        "degraded": bool(review and review.get("degraded")),
        "remarks": run.remarks,
    }


def _draft(run: Steps, first_attempt: str | None, language: str) -> dict[str, Any] | None:
    """A given first version, validated here as cline validates its own (worker/code.py); None if none."""
    if first_attempt is None:
        return None
    report = validate_code(first_attempt, language)
    draft = {"code": first_attempt, "validation": report}
    outcome, detail = judge(draft)
    run.record(StepRecord("draft", "copilot", "validate", None, outcome, 0.0, detail or "given first attempt"))
    return draft


async def _review_code(run: Steps, spec: str, language: str, source: str, seed: int) -> dict[str, Any] | None:
    if not source.strip():
        run.remark("no code to review")
        return None
    prompt = f"Review this {language} code written for: {spec}. Is it correct? Name one problem, or say it is fine."
    review = await run.step(
        "review", "grok", "synthesize", timeout_s=LLM_TIMEOUT_S, optional=True,
        prompt=prompt, context=source, max_tokens=96, seed=seed,
    )  # fmt: skip
    if review and review.get("degraded"):
        run.remark(f"grok's review is degraded: {review.get('degraded_reason')}")
    return review


def _option_name(option: Any) -> str:
    return str(option.get("name", "")) if isinstance(option, dict) else str(option)


async def review(
    run: Steps, options: list[Any], question: str, k: int = 3, max_tokens: int = 64, seed: int = 1
) -> dict[str, Any]:
    """grok weighs the options while curation gathers bank evidence for each, in parallel; the copilot merges."""
    names = [_option_name(option) for option in options]
    steps = [
        Step("analyze", "grok", "analyze", {"question": question, "options": options, "max_tokens": max_tokens,
                                             "seed": seed}, LLM_TIMEOUT_S),
        *(Step(f"evidence:{name}", "curation", "search", {"query": f"{name}: {question}", "k": k},
               SEARCH_TIMEOUT_S, optional=True) for name in names),
    ]  # fmt: skip
    got = await run.parallel(*steps)
    analysis = got["analyze"]
    assert analysis is not None
    if analysis.get("degraded"):
        run.remark(f"grok's analysis is degraded (evidence sentences, no LLM): {analysis.get('degraded_reason')}")
    merged = [_merge(run, row, got.get(f"evidence:{row['name']}")) for row in analysis["options"]]
    best = analysis["recommendation"]
    backed = any(row["name"] == best and row["evidence"] for row in merged)
    if not backed:
        run.remark(f"the bank holds no evidence for grok's recommendation {best}")
    return {
        "question": question,
        "recommendation": best,
        "recommendation_backed_by_bank": backed,
        "options": merged,
        "degraded": bool(analysis.get("degraded")),
        "remarks": run.remarks,
    }


def _merge(run: Steps, row: dict[str, Any], found: dict[str, Any] | None) -> dict[str, Any]:
    """grok's row for one option with the bank's evidence for it (None: its search was skipped)."""
    evidence = None if found is None else [
        {"id": hit["id"], "score": hit["score"], "chunk": hit["chunk"]} for hit in _relevant(found)
    ]  # fmt: skip
    if evidence is None:
        run.remark(f"no bank evidence was gathered for {row['name']}: its search was skipped")
    return {"name": row["name"], "relevance": row["relevance"], "assessment": row["assessment"], "evidence": evidence}
