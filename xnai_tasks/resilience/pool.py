"""A per-host cap on the processes of a role using one model at once: leases in Redis that expire.

A pool is a sorted set of lease ids scored by their expiry on the server's clock
(:func:`~xnai_tasks.core.constants.pool_key`). Acquiring drops expired leases and adds one only while fewer than
the cap are held; the holder renews its lease from a thread while it holds it, so a holder that dies (SIGKILL,
OOM) stops renewing and its lease expires after ``lease_s``. A caller that finds the pool full waits (polling,
with jitter) up to ``wait_s`` seconds, then is refused with :class:`PoolBusyError`: an oversubscribed host
queues instead of thrashing.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from xnai_tasks.core import constants as c
from xnai_tasks.errors import PoolBusyError

log = logging.getLogger(__name__)

#: Longest pause between two tries of a waiting caller, in seconds.
MAX_POLL_S = 0.5

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
"""
#: The key lives as long as its longest lease.
_KEEP = """
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(last[2]) - now)) end
"""

#: KEYS: pool. ARGV: lease id, cap, lease (ms). 1 when the lease was taken.
_ACQUIRE = (
    _NOW
    + """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
"""
    + _KEEP
    + "return 1\n"
)

#: KEYS: pool. ARGV: lease id, lease (ms). 1 when the lease was still held and is renewed.
_RENEW = (
    _NOW
    + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""
    + _KEEP
    + "return 1\n"
)


class ModelPool:
    """At most ``cap`` leases on ``model`` for ``role``'s processes on ``host``."""

    def __init__(self, conn: redis.Redis, role: str, model: str, host: str, *, cap: int, lease_s: float) -> None:
        self.conn = conn
        self.role = role
        self.model = model
        self.host = host
        self.cap = cap
        self.lease_ms = max(1, int(lease_s * 1000))
        self.key = c.pool_key(role, model, host)
        self._acquire = conn.register_script(_ACQUIRE)
        self._renew = conn.register_script(_RENEW)

    def try_acquire(self, lease_id: str) -> bool:
        """Take a lease now if one is free."""
        taken = self._acquire(keys=[self.key], args=[lease_id, self.cap, self.lease_ms])
        return bool(int(taken))

    def renew(self, lease_id: str) -> bool:
        """Extend a lease held; False when it had expired (then it is not taken again)."""
        kept = self._renew(keys=[self.key], args=[lease_id, self.lease_ms])
        return bool(int(kept))

    def release(self, lease_id: str) -> None:
        self.conn.zrem(self.key, lease_id)

    def acquire(self, wait_s: float) -> str:
        """A lease id, waiting up to ``wait_s`` seconds for one; else :class:`PoolBusyError`."""
        lease_id = uuid.uuid4().hex
        deadline = time.monotonic() + wait_s
        pause = 0.02
        while not self.try_acquire(lease_id):
            if time.monotonic() + pause > deadline:
                raise PoolBusyError(
                    f"all {self.cap} leases on {self.model} for {self.role} on {self.host} stayed taken for "
                    f"{wait_s:.0f} s (XNAI_MODEL_POOL, XNAI_POOL_WAIT)"
                )
            time.sleep(pause * (0.5 + random.random()))
            pause = min(MAX_POLL_S, pause * 2)
        return lease_id

    @contextmanager
    def lease(self, wait_s: float) -> Iterator[str]:
        """Hold a lease for the block, renewed every third of its length; released at the end."""
        lease_id = self.acquire(wait_s)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew_until, args=(lease_id, stop), daemon=True)
        renewer.name = f"xnai-lease-{self.model}"
        renewer.start()
        try:
            yield lease_id
        finally:
            stop.set()
            renewer.join(timeout=5)
            self.release(lease_id)

    def _renew_until(self, lease_id: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease_ms / 3000):
            try:
                if not self.renew(lease_id):
                    log.warning("lease on %s for %s expired while held", self.model, self.role)
                    return
            except redis.RedisError as exc:  # the next try may reach Redis; the lease lasts until then
                log.warning("could not renew a lease on %s: %s", self.model, exc)


def leases_in_use(conn: redis.Redis) -> list[dict[str, Any]]:
    """Every pool with leases held now: role, model, host, leases (SCAN: the admin's view, for ``xnai status``)."""
    seconds, micros = conn.time()
    now = int(seconds) * 1000 + int(micros) // 1000
    found = []
    for key in conn.scan_iter(match=f"{c.POOL_PREFIX}*", count=500):
        name = key.decode() if isinstance(key, bytes) else str(key)
        role, _, rest = name.removeprefix(c.POOL_PREFIX).partition(":")
        model, _, host = rest.rpartition(":")
        held = int(conn.zcount(key, now, "+inf"))
        if role in c.ROLES and held:
            found.append({"role": role, "model": model, "host": host, "leases": held})
    return sorted(found, key=lambda p: (p["role"], p["model"], p["host"]))
