"""Exact hits served by the client before anything is enqueued: one Redis round trip per hit.

The client (the copilot's Redis user, read-only on every role's cache) knows the role's models from the
hash the role's worker publishes at start (their sha256), computes the request's cache key and, in one
pipeline, reads the models again, the entry, counts the lookup and records its time (the role's eviction
moves an entry used since its store up: cache/store.py). It serves the entry only if the models
did not change and the role's signature over it verifies; a forged or altered entry is counted
(``bad_entry``) and the task runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import redis

from xnai_tasks.cache import store
from xnai_tasks.cache.entry import cache_key, hit_result, model_ids, verify_entry
from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected
from xnai_tasks.security.keyring import Keyring

log = logging.getLogger(__name__)

#: The agent whose counts the client's lookups go to (its own cache namespace).
CLIENT_AGENT = "copilot"


class ClientCache:
    """Exact lookups for one client: the role's models remembered between lookups, checked on every one."""

    def __init__(self, conn: redis.Redis, keyring: Keyring) -> None:
        self._conn = conn
        self._keyring = keyring
        self._models: dict[str, list[str]] = {}

    def lookup(self, role: str, task: str, kwargs: Mapping[str, Any], *, counted: bool = True) -> dict[str, Any] | None:
        """The verified cached answer to ``role.task(**kwargs)`` with its ``cache`` field, or None."""
        models = self._models.get(role)
        if models is None:
            models = self._models[role] = model_ids(self._conn.hgetall(c.model_verdicts_key(role)))
        if not models:
            return None  # no worker published checksummed models: nothing can be tied to them
        key = cache_key(role, task, kwargs, models)
        pipe = self._conn.pipeline(transaction=False)
        pipe.hgetall(c.model_verdicts_key(role))
        pipe.get(c.cache_entry_key(role, key))
        if counted:
            pipe.hincrby(c.cache_counts_key(CLIENT_AGENT), f"{role}:lookup", 1)
            pipe.zadd(c.cache_touch_key(role), {key: time.time()})
            pipe.zremrangebyrank(c.cache_touch_key(role), 0, -store.MAX_TOUCHES - 1)
        verdicts, raw = pipe.execute()[:2]
        current = model_ids(verdicts)
        if current != models:  # a new model since the last lookup: its key is another, old answers never serve
            self._models[role] = current
            raw = None
        if raw is None:
            if counted:
                store.count(self._conn, CLIENT_AGENT, role, "miss")
            return None
        try:
            body = verify_entry(self._keyring, raw, key=key, role=role, models=models)
        except MessageRejected as exc:
            log.warning("cache entry %s of %s refused (%s): %s", key[:12], role, exc.reason, exc.detail)
            if counted:
                store.count(self._conn, CLIENT_AGENT, role, "bad_entry")
            return None
        return hit_result(body, "exact", 1.0)

    def key_for(self, role: str, task: str, kwargs: Mapping[str, Any]) -> str | None:
        """The cache key of a request under the role's current models (None: they are not known)."""
        models = model_ids(self._conn.hgetall(c.model_verdicts_key(role)))
        return cache_key(role, task, kwargs, models) if models else None
