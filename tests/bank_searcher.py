"""A process of its own searching the memory bank as curation does: the tests' second worker process.

``python -m bank_searcher`` with XNAI_* in the environment (``Settings.to_env``) connects to the embedded Redis
as the curation user, then answers each line of stdin, ``{"vector": [...], "k": K, "model": NAME}``, with one
JSON line: ``{"hits": [[doc_id, chunk_index], ...], "loads": N}`` (N: times its matrix was loaded from Redis).
"""

from __future__ import annotations

import json
import sys

from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.settings import Settings
from xnai_tasks.worker.bank_matrix import matrix_for
from xnai_tasks.worker.memory_bank import MemoryBank


def main() -> None:
    conn = EmbeddedRedis(Settings.from_env()).client("curation")
    bank = MemoryBank(conn)
    for line in sys.stdin:
        query = json.loads(line)
        hits, _ = bank.search(query["vector"], query["k"], query["model"])
        found = [[hit.doc_id, hit.index] for hit in hits]
        print(json.dumps({"hits": found, "loads": matrix_for(conn).loads}), flush=True)


if __name__ == "__main__":
    main()
