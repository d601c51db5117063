"""The memory bank's search against its matrix kept in process, over a real embedded Redis, as the curation user.

The matrix must find what the earlier scan finds, see an index or a delete at the very next search (the
version counter), in this process and in another one, and still refuse a query of another encoder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from xnai_tasks.core import constants as c
from xnai_tasks.errors import ModelError
from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.settings import Settings
from xnai_tasks.worker.bank_matrix import matrix_for, top_k
from xnai_tasks.worker.memory_bank import MemoryBank

from support import run_xnai, short_home

TESTS_DIR = str(Path(__file__).resolve().parent)
MODEL = "test-encoder"
DIM = 384
DOCS = 30
CHUNKS_PER_DOC = 10


@pytest.fixture(scope="module")
def settings() -> Iterator[Settings]:
    home = short_home()
    yield Settings(home=home)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def conn(settings: Settings) -> Iterator[redis.Redis]:
    """The curation user's connection to a private embedded Redis holding a bank of 300 random chunks."""
    with EmbeddedRedis(settings) as server:
        curation = server.client("curation")
        bank = MemoryBank(curation)
        rng = np.random.default_rng(7)
        for d in range(DOCS):
            texts = [f"doc {d} chunk {i}" for i in range(CHUNKS_PER_DOC)]
            bank.put(f"doc-{d}", 100, texts, unit(rng.standard_normal((CHUNKS_PER_DOC, DIM))).tolist(), MODEL)
        yield curation
        curation.close()


def unit(matrix: Any) -> Any:
    return matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)


def ids(hits: list[Any]) -> list[tuple[str, int]]:
    return [(hit.doc_id, hit.index) for hit in hits]


def test_the_matrix_finds_the_same_top_k_as_the_scan(conn: redis.Redis) -> None:
    # Given a bank of 300 chunks and random queries
    bank = MemoryBank(conn)
    rng = np.random.default_rng(11)
    for query in unit(rng.standard_normal((5, DIM))).tolist():
        for k in (1, 5, 400):
            # When the matrix and the earlier scan each search
            new, new_scanned = bank.search(query, k, MODEL)
            old, old_scanned = bank.search_by_scan(query, k, MODEL)
            # Then they return the same chunks in the same order, with the same scores
            assert ids(new) == ids(old) and new_scanned == old_scanned == DOCS * CHUNKS_PER_DOC
            assert [h.score for h in new] == pytest.approx([h.score for h in old], abs=1e-6)


def test_top_k_is_the_best_first_without_a_full_sort() -> None:
    # Given scores with a tie
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.3], dtype=np.float32)
    # Then the top 3 are best first, the tie in index order, as a stable full sort would give
    assert top_k(scores, 3) == [1, 3, 2]
    assert top_k(scores, 9) == [1, 3, 2, 4, 0]


def test_an_indexed_and_a_deleted_document_are_seen_at_the_next_search(conn: redis.Redis) -> None:
    # Given a search that loaded the matrix, and a query no chunk is close to
    bank = MemoryBank(conn)
    query = unit(np.random.default_rng(3).standard_normal(DIM)).tolist()
    bank.search(query, 3, MODEL)
    loads = matrix_for(conn).loads
    version = int(conn.get(c.bank_version_key()) or 0)
    # When the bank has not changed, a search reuses the matrix
    bank.search(query, 3, MODEL)
    assert matrix_for(conn).loads == loads
    # When a document whose chunk is the query itself is indexed
    bank.put("fresh", 10, ["the query itself"], [query], MODEL)
    # Then the version moved and the very next search finds it first, from a reloaded matrix
    assert int(conn.get(c.bank_version_key()) or 0) == version + 1
    hits, scanned = bank.search(query, 3, MODEL)
    assert ids(hits)[0] == ("fresh", 0) and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert scanned == DOCS * CHUNKS_PER_DOC + 1 and matrix_for(conn).loads == loads + 1
    # When it is deleted
    assert bank.delete("fresh") == 1
    # Then the next search no longer finds it, and nothing of it is left in Redis
    hits, scanned = bank.search(query, 3, MODEL)
    assert "fresh" not in {doc for doc, _ in ids(hits)} and scanned == DOCS * CHUNKS_PER_DOC
    assert not conn.exists(c.bank_doc_key("fresh"), c.bank_chunk_key("fresh", 0))
    assert ids(hits) == ids(bank.search_by_scan(query, 3, MODEL)[0])


def test_another_process_sees_an_index_and_a_delete(conn: redis.Redis, settings: Settings) -> None:
    # Given another process that searched once (its own matrix loaded)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")} | settings.to_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bank_searcher"],
        env=env | {"PYTHONPATH": TESTS_DIR},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    query = unit(np.random.default_rng(5).standard_normal(DIM)).tolist()

    def ask() -> dict[str, Any]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"vector": query, "k": 3, "model": MODEL}) + "\n")
        proc.stdin.flush()
        return dict(json.loads(proc.stdout.readline()))

    try:
        before = ask()
        assert ["other", 0] not in before["hits"]
        # When this process indexes a document matching the query
        MemoryBank(conn).put("other", 10, ["seen elsewhere"], [query], MODEL)
        # Then the other process finds it at its next search (a reload), and no longer after a delete
        after = ask()
        assert after["hits"][0] == ["other", 0] and after["loads"] == before["loads"] + 1
        MemoryBank(conn).delete("other")
        gone = ask()
        assert ["other", 0] not in gone["hits"] and gone["loads"] == after["loads"] + 1
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_a_query_of_another_encoder_is_refused_and_the_bank_kept(conn: redis.Redis) -> None:
    # Given a bank of MODEL's vectors whose matrix this process holds
    bank = MemoryBank(conn)
    query = unit(np.random.default_rng(9).standard_normal(DIM)).tolist()
    bank.search(query, 3, MODEL)
    # When another encoder's query (another name, or another dimension) searches
    # Then it is refused, naming both encoders, and the bank is unchanged
    with pytest.raises(ModelError, match=f"holds 384-d vectors of {MODEL}, this encoder is other"):
        bank.search(query, 3, "other")
    with pytest.raises(ModelError, match="this encoder is test-encoder \\(8-d\\)"):
        bank.search(query[:8], 3, MODEL)
    assert bank.chunk_count() == DOCS * CHUNKS_PER_DOC


def test_bench_search_reports_both_ways_and_their_ratio(settings: Settings) -> None:
    # When the search benchmark runs on a small bank (its own private Redis)
    done = run_xnai(["bench", "search", "--chunks", "200", "--rounds", "1", "--json"], settings)
    # Then it reports each way's p50 and the ratio the gate compares (no timing is judged here)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["p50_ms"]) == {"old", "new"} and report["chunks"] == 200
    assert report["ratios"]["new_vs_old_p50"] > 0
