"""Curation: chunking, batched embedding, indexing into the memory bank, semantic search, classification.

Every task runs the role's encoder (all-MiniLM-L6-v2 by default): preloaded in the worker parent, or
loaded on first use in lazy mode. Vectors are L2-normalised, so scores are cosine similarities.
With ``XNAI_BATCH=on`` the texts of tasks running at once share encoder calls (xnai_tasks/batching); each
result's ``batch`` names its call (``call`` 0: not batched) and how many tasks and texts it carried.
"""

from __future__ import annotations

import json
import os
from typing import Any

from xnai_tasks.batching import runtime as batching
from xnai_tasks.errors import ModelError, UsageError
from xnai_tasks.models import inference as m
from xnai_tasks.worker import startup as runtime
from xnai_tasks.worker.arguments import require_count, require_text, require_texts
from xnai_tasks.worker.memory_bank import MemoryBank
from xnai_tasks.worker.role_task import RoleTask, register_diagnostics, role_task
from xnai_tasks.worker.timer import Timer

ROLE = "curation"
#: Chunks of at most this many words (an encoder token is ~0.75 word; the encoder reads 256 tokens).
CHUNK_WORDS = 150
CHUNK_OVERLAP = 30
#: How a label is phrased for the encoder when classifying.
LABEL_TEMPLATE = "This text is about {label}."
#: Most characters of one document's provenance (it holds the producing worker's signed result).
PROVENANCE_MAX_CHARS = 256_000

register_diagnostics(ROLE)


def _encode(texts: list[str], timer: Timer) -> tuple[list[list[float]], str]:
    """Embed with the role's encoder (through the batcher when this worker batches); the vectors and the model."""
    vectors, model, _ = _encode_shared(texts, timer)
    return vectors, model


def _encode_shared(texts: list[str], timer: Timer) -> tuple[list[list[float]], str, dict[str, Any]]:
    """:func:`_encode`, through this worker's batcher when it batches; also the ``batch`` a result reports.

    Timed: the load (if this call loads the model) and the embedding.
    """
    if batching.current() is None:
        holder = runtime.registry(ROLE).encoder
        batch_size = int(holder.model.params.get("batch_size", 32))
        with runtime.using(holder, timer) as encoder, timer.phase("embed"):
            vectors = m.embed(encoder, texts, batch_size=batch_size)
        return vectors, holder.model.name, {"call": 0, "tasks": 1, "texts": len(texts)}
    try:
        with timer.phase("embed"):
            done = batching.encode(texts)
    except (ValueError, TypeError) as exc:  # e.g. a text the tokenizer cannot read: this task's alone
        raise ModelError(f"the encoder could not read the text: {exc}") from None
    model = runtime.registry(ROLE).encoder.model.name
    batch = {"call": done.call, "tasks": done.requests, "texts": done.texts, "encode_ms": round(done.seconds * 1000, 1)}
    return done.vectors, model, batch


@role_task(ROLE)
def embed(self: RoleTask, texts: list[str]) -> dict[str, Any]:
    """Embeddings of ``texts`` (one batched pass): L2-normalised float vectors, in order."""
    timer = Timer()
    with batching.expecting():
        items = require_texts("texts", texts)
        vectors, model, batch = _encode_shared(items, timer)
    timings = timer.as_dict()
    return {
        "model": model,
        "pid": os.getpid(),
        "count": len(vectors),
        "dim": len(vectors[0]),
        "vectors": vectors,
        "batch": batch,
        "timings": timings | {"texts_per_s": round(len(items) / max(timings["embed_s"], 1e-9), 1)},
    }


@role_task(ROLE)
def index(self: RoleTask, documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Chunk, embed and store ``documents`` (``[{"id", "text"}]``) in the memory bank.

    A document indexed again under the same id replaces the earlier one. A document may carry a
    ``provenance`` object (xnai_tasks/workflow/provenance.py), returned with every hit of its chunks.
    """
    if not isinstance(documents, list) or not documents:
        raise UsageError('documents must be a non-empty list of {"id": ..., "text": ...}')
    docs: list[tuple[str, str]] = []
    origins: dict[str, str] = {}
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict) or set(doc) - {"id", "text", "provenance"}:
            raise UsageError(f'documents[{i}] must be an object with "id", "text" and optionally "provenance"')
        doc_id = require_text(f"documents[{i}].id", doc.get("id"), max_chars=256)
        docs.append((doc_id, require_text(f"documents[{i}].text", doc.get("text"), max_chars=2_000_000)))
        if "provenance" in doc:
            origins[doc_id] = _provenance(i, doc["provenance"])
    if len({doc_id for doc_id, _ in docs}) != len(docs):
        raise UsageError("documents has the same id twice")
    timer = Timer()
    with timer.phase("chunk"):
        chunked = [(doc_id, text, m.chunk_text(text, CHUNK_WORDS, CHUNK_OVERLAP)) for doc_id, text in docs]
    flat = [chunk for _, _, chunks in chunked for chunk in chunks]
    vectors, model = _encode(flat, timer)
    bank = MemoryBank()
    with timer.phase("store"):
        start = 0
        for doc_id, text, chunks in chunked:
            bank.put(doc_id, len(text), chunks, vectors[start : start + len(chunks)], model, origins.get(doc_id))
            start += len(chunks)
    return {
        "model": model,
        "pid": os.getpid(),
        "documents": len(docs),
        "chunks": len(flat),
        "ids": [doc_id for doc_id, _ in docs],
        "chunks_per_document": {doc_id: len(chunks) for doc_id, _, chunks in chunked},
        "bank_chunks": bank.chunk_count(),
        "timings": timer.as_dict(),
    }


def _provenance(i: int, value: Any) -> str:
    """A document's provenance as compact JSON: an object, at most :data:`PROVENANCE_MAX_CHARS`."""
    if not isinstance(value, dict):
        raise UsageError(f"documents[{i}].provenance must be an object")
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    if len(text) > PROVENANCE_MAX_CHARS:
        raise UsageError(f"documents[{i}].provenance is over {PROVENANCE_MAX_CHARS} characters")
    return text


@role_task(ROLE)
def search(self: RoleTask, query: str, k: int = 5) -> dict[str, Any]:
    """The ``k`` chunks of the memory bank closest in meaning to ``query``: ids, chunks and scores, best first."""
    timer = Timer()
    with batching.expecting():
        text = require_text("query", query, max_chars=10_000)
        count = require_count("k", k, 1, 100)
        vectors, model, batch = _encode_shared([text], timer)
    with timer.phase("search"):
        hits, scanned = MemoryBank().search(vectors[0], count, model)
    return {
        "model": model,
        "pid": os.getpid(),
        "query": text,
        "k": count,
        "scanned_chunks": scanned,
        "hits": [hit.to_dict() for hit in hits],
        "batch": batch,
        "timings": timer.as_dict(),
    }


@role_task(ROLE)
def classify(self: RoleTask, text: str, labels: list[str]) -> dict[str, Any]:
    """Score each label by the cosine similarity of ``text`` to "This text is about LABEL."; best first."""
    timer = Timer()
    with batching.expecting():
        body = require_text("text", text)
        names = require_texts("labels", labels, max_items=200)
        if len(set(names)) != len(names):
            raise UsageError("labels has the same label twice")
        texts = [body] + [LABEL_TEMPLATE.format(label=name) for name in names]
        vectors, model, batch = _encode_shared(texts, timer)
    scores = {name: round(m.cosine(vectors[0], vector), 4) for name, vector in zip(names, vectors[1:], strict=True)}
    ranking = sorted(names, key=lambda name: scores[name], reverse=True)
    return {
        "model": model,
        "pid": os.getpid(),
        "label": ranking[0],
        "scores": scores,
        "ranking": ranking,
        "margin": round(scores[ranking[0]] - scores[ranking[1]], 4) if len(ranking) > 1 else None,
        "method": f"cosine similarity to '{LABEL_TEMPLATE}'",
        "batch": batch,
        "timings": timer.as_dict(),
    }
