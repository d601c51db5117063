"""The memory bank's vectors kept in this process: one float32 matrix, reloaded only when the bank changes.

Every index or delete bumps the bank's version counter (:func:`xnai_tasks.core.constants.bank_version_key`)
in its own transaction, so one ``GET`` per search says whether the matrix in hand is current. The version
is read before the vectors are loaded: a change during a load makes the next search load again, never
keeps a stale matrix. A bank written before the counter existed (no version) is loaded on every search.
The matrix costs ``chunks x dim x 4`` bytes per process (15 MiB for 10,000 MiniLM chunks).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from kombu.utils.encoding import bytes_to_str

from xnai_tasks.core import constants as c

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """The bank's vectors at one version: chunk keys (sorted) and their rows, and the encoder that made them."""

    version: bytes | None
    keys: list[bytes]
    matrix: npt.NDArray[np.float32]
    model: str | None
    dim: int


def load_snapshot(conn: redis.Redis, version: bytes | None = None) -> Snapshot:
    """Every chunk vector of the bank now, in the order of the sorted chunk keys.

    ``version``: the bank's version counter as the caller read it just before (read here when not given);
    read before the vectors, so a change while they load makes the next search load again.
    """
    import numpy as np

    if version is None:
        version = conn.get(c.bank_version_key())
    meta = conn.hgetall(c.bank_meta_key())
    model = bytes_to_str(meta[b"model"]) if b"model" in meta else None
    dim = int(meta.get(b"dim", b"0"))
    keys = sorted(conn.smembers(c.bank_chunks_key()))
    pipe = conn.pipeline(transaction=False)
    for key in keys:
        pipe.hget(key, "vector")
    blobs = pipe.execute() if keys else []
    present = [(key, blob) for key, blob in zip(keys, blobs, strict=True) if blob and len(blob) == dim * 4]
    matrix = np.frombuffer(b"".join(blob for _, blob in present), dtype="<f4").reshape(len(present), dim)
    return Snapshot(version=version, keys=[key for key, _ in present], matrix=matrix, model=model, dim=dim)


class BankMatrix:
    """One Redis's bank vectors in this process, current as of the last search."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        #: How many times the vectors were loaded from Redis (for tests and the benchmark).
        self.loads = 0

    def current(self, conn: redis.Redis) -> Snapshot:
        """The bank's vectors as of now: the matrix in hand if the version is unchanged, else loaded anew."""
        version = conn.get(c.bank_version_key())
        with self._lock:
            held = self._snapshot
            if held is not None and version is not None and held.version == version:
                return held
            fresh = load_snapshot(conn, version)
            self._snapshot = fresh
            self.loads += 1
            return fresh


def top_k(scores: npt.NDArray[np.float32], k: int) -> list[int]:
    """Indices of the ``k`` highest scores, best first (ties: lower index first), without sorting them all."""
    import numpy as np

    picked = np.arange(len(scores)) if k >= len(scores) else np.argpartition(-scores, k - 1)[:k]
    order = np.lexsort((picked, -scores[picked]))
    return [int(i) for i in picked[order]]


_matrices: dict[str, BankMatrix] = {}
_matrices_lock = threading.Lock()


def _forget_after_fork() -> None:
    """A forked child starts with no matrix and fresh locks (another thread may have held them at the fork)."""
    global _matrices_lock
    _matrices.clear()
    _matrices_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def matrix_for(conn: redis.Redis) -> BankMatrix:
    """This process's matrix of the Redis ``conn`` talks to (one per server and database)."""
    kwargs = conn.connection_pool.connection_kwargs
    where = f"{kwargs.get('path') or kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
    with _matrices_lock:
        return _matrices.setdefault(where, BankMatrix())
