"""Retrieval first: what the memory bank holds about a question, to ground the LLM roles' answers.

Only curation reads the bank (its ACL); the copilot asks curation for the chunks closest to a question and
passes those that are relevant enough to cline or grok as their ``context``. A small model answers far
better from a relevant paragraph than from what it half remembers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xnai_tasks.client.sync import Client

#: Cosine similarity (all-MiniLM-L6-v2) below which a chunk is not taken as evidence for a question.
#: On the demo's documents a relevant chunk scores about 0.5, an unrelated one below 0.2.
MIN_SCORE = 0.35


def bank_context(client: Client, query: str, *, k: int = 3, min_score: float = MIN_SCORE, timeout: float = 60) -> str:
    """The bank's chunks about ``query`` scoring at least ``min_score``, best first, one per line ("" if none)."""
    found: dict[str, Any] = client.submit("curation", "search", query=query, k=k).get(timeout=timeout)
    return "\n".join(hit["chunk"] for hit in found["hits"] if hit["score"] >= min_score)
