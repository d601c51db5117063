"""``xnai bench search``: a memory bank search over N chunks, the in-process matrix against today's scan.

A private embedded Redis (always: the bench writes a bank of its own, never into a configured one) gets
``chunks`` random unit vectors of the encoder's dimension (384) in documents of 10 chunks, written as
curation writes them. Each query vector is searched both ways, alternating, over the curation role's own
connection: ``old`` (:meth:`MemoryBank.search_by_scan`: every vector read from Redis per query, a full
sort) and ``new`` (:meth:`MemoryBank.search`: the matrix kept in process, one GET of the version per query,
a partial sort). The query's embedding is not timed (the same for both). Both must return the same top
``k``. Reported: p50 and p95 milliseconds of each way, the first search's (the matrix load), and
``ratios.new_vs_old_p50`` (lower is better).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from xnai_tasks.bench.harness import host_facts
from xnai_tasks.bench.options import BenchOptions, SearchOptions
from xnai_tasks.core import broker
from xnai_tasks.errors import XnaiError
from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.security import redis_urls
from xnai_tasks.security.key_admin import init_keys
from xnai_tasks.settings import Settings
from xnai_tasks.worker.memory_bank import Hit, MemoryBank

DIM: Final = 384
CHUNKS_PER_DOC: Final = 10
MODEL: Final = "bench-random-unit-vectors"
SEED: Final = 13


def run_search(settings: Settings, options: BenchOptions, search: SearchOptions | None = None) -> dict[str, Any]:
    """Both ways over one bank of ``search.chunks`` chunks, ``search.queries`` queries each."""
    search = search or SearchOptions()
    home = Path(tempfile.mkdtemp(prefix="xnai-bench-", dir="/tmp"))
    private = replace(settings, home=home, redis_url=None)
    init_keys(home)
    try:
        with EmbeddedRedis(private):
            conn = broker.connect(redis_urls.connection_url(private, "curation"), timeout=30)
            try:
                return _measure(MemoryBank(conn), search, rounds=options.rounds)
            finally:
                conn.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _measure(bank: MemoryBank, search: SearchOptions, *, rounds: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(SEED)
    _fill(bank, rng, search.chunks)
    queries = _unit(rng.standard_normal((search.queries, DIM)).astype("<f4"))
    start = time.perf_counter()
    bank.search(queries[0].tolist(), search.k, MODEL)
    first_ms = (time.perf_counter() - start) * 1000
    times: dict[str, list[float]] = {"old": [], "new": []}
    ways: dict[str, Callable[..., tuple[list[Hit], int]]] = {"old": bank.search_by_scan, "new": bank.search}
    for _ in range(rounds):
        for query in queries:
            found = {name: _timed(way, query.tolist(), search.k, times[name]) for name, way in ways.items()}
            if [(h.doc_id, h.index) for h in found["old"]] != [(h.doc_id, h.index) for h in found["new"]]:
                raise XnaiError("bench search: the matrix and the scan disagree on the top k")
    p50 = {name: _percentile(values, 50) for name, values in times.items()}
    return {
        "benchmark": "search",
        "chunks": search.chunks,
        "dim": DIM,
        "k": search.k,
        "queries": len(times["new"]),
        "p50_ms": p50,
        "p95_ms": {name: _percentile(values, 95) for name, values in times.items()},
        "first_new_search_ms": round(first_ms, 2),
        "ratios": {"new_vs_old_p50": round(p50["new"] / p50["old"], 4) if p50["old"] else None},
        "host": host_facts(),
    }


def _fill(bank: MemoryBank, rng: Any, chunks: int) -> None:
    """``chunks`` random unit vectors in documents of :data:`CHUNKS_PER_DOC`, written as curation writes them."""
    vectors = _unit(rng.standard_normal((chunks, DIM)).astype("<f4"))
    for start in range(0, chunks, CHUNKS_PER_DOC):
        rows = vectors[start : start + CHUNKS_PER_DOC]
        texts = [f"chunk {start + i} of the search benchmark" for i in range(len(rows))]
        bank.put(f"doc-{start // CHUNKS_PER_DOC}", 40 * len(rows), texts, rows.tolist(), MODEL)


def _unit(matrix: Any) -> Any:
    import numpy as np

    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def _timed(way: Callable[..., tuple[list[Hit], int]], query: list[float], k: int, into: list[float]) -> list[Hit]:
    start = time.perf_counter()
    hits, _ = way(query, k, MODEL)
    into.append((time.perf_counter() - start) * 1000)
    return hits


def _percentile(values: list[float], pct: int) -> float:
    if len(values) < 2:
        return round(values[0], 3) if values else 0.0
    return round(statistics.quantiles(values, n=100, method="inclusive")[pct - 1], 3)
