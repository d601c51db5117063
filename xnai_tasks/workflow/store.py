"""Records of workflow runs in Redis: one JSON string per run, and a bounded list of recent run ids."""

from __future__ import annotations

import json
from typing import Any

import redis

from xnai_tasks.core import constants as c

#: States a run's record goes through (cancelled: the async caller gave up on it, its steps were revoked).
RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


class RunStore:
    """Save and read run records (the copilot's keys: security/acl.py)."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn

    def save(self, record: dict[str, Any], *, new: bool = False) -> None:
        """Write ``record`` (its ``run_id``); a new one also goes first in the list of recent runs."""
        run_id = str(record["run_id"])
        pipe = self.conn.pipeline(transaction=True)
        pipe.set(c.workflow_run_key(run_id), json.dumps(record), ex=c.WORKFLOW_RUN_TTL_S)
        if new:
            pipe.lpush(c.workflow_runs_key(), run_id)
            pipe.ltrim(c.workflow_runs_key(), 0, c.WORKFLOW_RUNS_MAX - 1)
        pipe.execute()

    def load(self, run_id: str) -> dict[str, Any] | None:
        """One run's record, or None (unknown, or expired)."""
        raw = self.conn.get(c.workflow_run_key(run_id))
        return None if raw is None else dict(json.loads(raw))

    def recent(self, limit: int = c.WORKFLOW_RUNS_MAX) -> list[dict[str, Any]]:
        """The newest runs first (those whose record expired are left out)."""
        ids = [
            i.decode() if isinstance(i, bytes) else str(i)
            for i in self.conn.lrange(c.workflow_runs_key(), 0, limit - 1)
        ]
        if not ids:
            return []
        raws = self.conn.mget([c.workflow_run_key(i) for i in ids])
        return [dict(json.loads(raw)) for raw in raws if raw is not None]


def store_of(client: Any) -> RunStore:
    """The run store on a client's Redis connection (its result backend's, as the copilot)."""
    return RunStore(client.app.backend.client)
