"""The memory bank: chunks of indexed documents and their embeddings, kept in Redis.

Every key is under ``xnai:bank:`` (:mod:`xnai_tasks.core.constants`): a meta hash (which encoder made the
vectors), a set of chunk keys, one hash per document and one per chunk. Vectors are little-endian
float32 bytes (never a Python-object serializer); they are L2-normalised, so a dot product is the cosine similarity.

All Redis access of the role tasks goes through :func:`connection`: the credentials a role uses can be
changed in that one place. A search multiplies the query with the bank's matrix kept in this process
(:mod:`xnai_tasks.worker.bank_matrix`), reloaded only when the bank's version counter moved (every put and
delete bumps it); :meth:`MemoryBank.search_by_scan` is the earlier way, loading every vector per query, kept
as the reference the benchmark and tests compare with. Fine for tens of thousands of chunks, not millions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from kombu.utils.encoding import bytes_to_str

from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import ModelError
from xnai_tasks.settings import process_settings
from xnai_tasks.worker.bank_matrix import matrix_for, top_k

REDIS_TIMEOUT_S = 10.0


class _TaskConnection:
    """This process's Redis connection for the role tasks: made on first use, made again after a fork."""

    def __init__(self) -> None:
        self.pid = 0
        self.conn: redis.Redis | None = None

    def get(self) -> redis.Redis:
        if self.conn is None or self.pid != os.getpid():
            from xnai_tasks.core.celery_app import app

            # In a role worker the app's broker URL carries that role's ACL credentials (security.acl).
            url = app.conf.broker_url or process_settings().broker_url
            self.conn = broker.connect(url, timeout=REDIS_TIMEOUT_S)
            self.pid = os.getpid()
        return self.conn


_connection = _TaskConnection()


def connection() -> redis.Redis:
    """This process's Redis connection for the role tasks (made once per process, again after a fork)."""
    return _connection.get()


@dataclass(frozen=True, kw_only=True)
class Hit:
    """One search result: the chunk, where it comes from, and its cosine similarity to the query."""

    doc_id: str
    index: int
    text: str
    score: float
    #: The document's provenance as JSON (xnai_tasks/workflow/provenance.py), if it was indexed with one.
    provenance: str | None = None

    def to_dict(self) -> dict[str, Any]:
        found = {"id": self.doc_id, "chunk_index": self.index, "chunk": self.text, "score": round(self.score, 4)}
        return found if self.provenance is None else found | {"provenance": self.provenance}


def to_bytes(vector: Sequence[float]) -> bytes:
    import numpy as np

    return bytes(np.asarray(vector, dtype="<f4").tobytes())


class MemoryBank:
    """Store and search chunk embeddings of one encoder model."""

    def __init__(self, conn: redis.Redis | None = None) -> None:
        self.conn = connection() if conn is None else conn

    def check_model(self, model: str, dim: int) -> None:
        """Refuse to mix vectors of different encoders in one bank."""
        meta = self.conn.hgetall(c.bank_meta_key())
        if not meta:
            return
        held, held_dim = bytes_to_str(meta.get(b"model", b"?")), int(meta.get(b"dim", b"0"))
        if (held, held_dim) != (model, dim) and self.conn.scard(c.bank_chunks_key()) > 0:
            raise _mixed(held, held_dim, model, dim)

    def put(
        self,
        doc_id: str,
        chars: int,
        chunks: Sequence[str],
        vectors: Sequence[Sequence[float]],
        model: str,
        provenance: str | None = None,
    ) -> None:
        """Replace the document ``doc_id`` by these chunks and vectors (and its provenance), in one transaction."""
        dim = len(vectors[0]) if vectors else 0
        self.check_model(model, dim)
        old = int(self.conn.hget(c.bank_doc_key(doc_id), "chunks") or 0)
        pipe = self.conn.pipeline(transaction=True)
        stale = [c.bank_chunk_key(doc_id, i) for i in range(len(chunks), old)]
        if stale:
            pipe.delete(*stale)
            pipe.srem(c.bank_chunks_key(), *stale)
        pipe.hset(c.bank_meta_key(), mapping={"model": model, "dim": dim})
        for i, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True)):
            key = c.bank_chunk_key(doc_id, i)
            pipe.hset(key, mapping={"doc_id": doc_id, "index": i, "text": chunk, "vector": to_bytes(vector)})
            pipe.sadd(c.bank_chunks_key(), key)
        pipe.hset(
            c.bank_doc_key(doc_id),
            mapping={"chunks": len(chunks), "chars": chars, "model": model, "indexed_at": time.time()},
        )
        pipe.hdel(c.bank_doc_key(doc_id), "provenance")
        if provenance is not None:
            pipe.hset(c.bank_doc_key(doc_id), "provenance", provenance)
        pipe.incr(c.bank_version_key())
        pipe.execute()

    def delete(self, doc_id: str) -> int:
        """Remove the document ``doc_id`` and its chunks, in one transaction; how many chunks it had."""
        held = int(self.conn.hget(c.bank_doc_key(doc_id), "chunks") or 0)
        chunk_keys = [c.bank_chunk_key(doc_id, i) for i in range(held)]
        pipe = self.conn.pipeline(transaction=True)
        if chunk_keys:
            pipe.delete(*chunk_keys)
            pipe.srem(c.bank_chunks_key(), *chunk_keys)
        pipe.delete(c.bank_doc_key(doc_id))
        pipe.incr(c.bank_version_key())
        pipe.execute()
        return held

    def search(self, vector: Sequence[float], k: int, model: str) -> tuple[list[Hit], int]:
        """The ``k`` chunks most similar to ``vector``, best first, and how many chunks were scanned.

        Against this process's matrix of the bank (one GET when the bank has not changed), top ``k`` by
        partition, not a full sort; the texts of those ``k`` are read from Redis.
        """
        import numpy as np

        query = np.asarray(vector, dtype="<f4")
        snapshot = matrix_for(self.conn).current(self.conn)
        if snapshot.keys and (snapshot.model, snapshot.dim) != (model, int(query.shape[0])):
            raise _mixed(snapshot.model or "?", snapshot.dim, model, int(query.shape[0]))
        if not snapshot.keys:
            return [], 0
        scores = snapshot.matrix @ query
        best = top_k(scores, k)
        return self._hits([(snapshot.keys[i], float(scores[i])) for i in best]), len(snapshot.keys)

    def _hits(self, scored: list[tuple[bytes, float]]) -> list[Hit]:
        """The chunks of ``scored`` keys, in order, with their scores (a chunk deleted meanwhile is left out)."""
        pipe = self.conn.pipeline(transaction=False)
        for key, _ in scored:
            pipe.hmget(key, "doc_id", "index", "text")
        found = [(row, score) for (_, score), row in zip(scored, pipe.execute(), strict=True) if row[0] is not None]
        origins = self._provenance({bytes_to_str(row[0]) for row, _ in found})
        return [
            Hit(doc_id=str(doc), index=int(index), text=bytes_to_str(text), score=score, provenance=origins.get(doc))
            for (raw_doc, index, text), score in found
            for doc in (bytes_to_str(raw_doc),)
        ]

    def _provenance(self, doc_ids: set[str]) -> dict[str, str]:
        """The provenance of those documents that have one."""
        ordered = sorted(doc_ids)
        pipe = self.conn.pipeline(transaction=False)
        for doc_id in ordered:
            pipe.hget(c.bank_doc_key(doc_id), "provenance")
        return {doc: bytes_to_str(raw) for doc, raw in zip(ordered, pipe.execute(), strict=True) if raw is not None}

    def search_by_scan(self, vector: Sequence[float], k: int, model: str) -> tuple[list[Hit], int]:
        """:meth:`search` the earlier way: every vector read from Redis for this query, then a full sort."""
        import numpy as np

        query = np.asarray(vector, dtype="<f4")
        self.check_model(model, int(query.shape[0]))
        keys = sorted(self.conn.smembers(c.bank_chunks_key()))
        if not keys:
            return [], 0
        pipe = self.conn.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "vector")
        raw = pipe.execute()
        present = [(key, blob) for key, blob in zip(keys, raw, strict=True) if blob and len(blob) == query.nbytes]
        if not present:
            return [], 0
        matrix = np.frombuffer(b"".join(blob for _, blob in present), dtype="<f4").reshape(len(present), -1)
        scores = matrix @ query
        best = np.argsort(-scores, kind="stable")[:k]
        pipe = self.conn.pipeline(transaction=False)
        for i in best:
            pipe.hmget(present[int(i)][0], "doc_id", "index", "text")
        hits = [
            Hit(doc_id=bytes_to_str(doc_id), index=int(index), text=bytes_to_str(text), score=float(scores[int(i)]))
            for i, (doc_id, index, text) in zip(best, pipe.execute(), strict=True)
            if doc_id is not None
        ]
        return hits, len(present)

    def chunk_count(self) -> int:
        """How many chunks the bank holds."""
        return int(self.conn.scard(c.bank_chunks_key()))


def _mixed(held: str, held_dim: int, model: str, dim: int) -> ModelError:
    return ModelError(
        f"the memory bank holds {held_dim}-d vectors of {held}, this encoder is {model} ({dim}-d): "
        f"search with the same encoder, or delete the {c.BANK_PREFIX}* keys to re-index"
    )
