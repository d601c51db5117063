"""Each role's recent throughput, counted in Redis by its workers, and the retry-after a refused caller is told.

A pool process adds one to ``xnai:rate:ROLE:BUCKET`` (buckets of ``THROUGHPUT_BUCKET_S`` seconds, expiring soon
after the window) when a task ends; the rate is what the last ``THROUGHPUT_BUCKETS`` buckets and the current one
counted, over their seconds. A caller refused at a full queue is told to come back once the role, at that rate,
has worked through the queue it found.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Final

import redis

from xnai_tasks.core import constants as c

log = logging.getLogger(__name__)

#: The retry-after when no task of the role ended in the window (its workers are gone or stuck): a minute.
NO_RATE_RETRY_S: Final = 60.0
#: Bounds of the retry-after: at least a second, at most an hour.
MIN_RETRY_S: Final = 1.0
MAX_RETRY_S: Final = 3600.0
#: Seconds a bucket is kept: the window and one bucket more.
BUCKET_TTL_S: Final = (c.THROUGHPUT_BUCKETS + 2) * c.THROUGHPUT_BUCKET_S


def bucket_of(now: float) -> int:
    """The bucket a time falls in."""
    return int(now // c.THROUGHPUT_BUCKET_S)


def recent_rate(conn: redis.Redis, role: str, now: float | None = None) -> float | None:
    """Tasks per second the role ended over the window; None when none ended in it.

    The window starts at its oldest bucket with a count (a role that started working 20 s ago is not diluted
    over a minute), and is at least one bucket long.
    """
    now = time.time() if now is None else now
    current = bucket_of(now)
    keys = [c.throughput_key(role, current - i) for i in range(c.THROUGHPUT_BUCKETS + 1)]
    counts = [int(value) if value else 0 for value in conn.mget(keys)]
    if not any(counts):
        return None
    oldest = max(i for i, count in enumerate(counts) if count)
    elapsed_s = oldest * c.THROUGHPUT_BUCKET_S + (now - current * c.THROUGHPUT_BUCKET_S)
    window_s = max(float(c.THROUGHPUT_BUCKET_S), elapsed_s)
    return sum(counts) / window_s


def retry_after_s(depth: int, rate: float | None) -> float:
    """Seconds until the role has worked through ``depth`` messages at ``rate``, within the bounds."""
    if rate is None or rate <= 0:
        return NO_RATE_RETRY_S
    return float(min(MAX_RETRY_S, max(MIN_RETRY_S, math.ceil(depth / rate))))


class ThroughputRecorder:
    """This process's side: one count per ended task, on a connection of its own (made after the fork).

    A task whose final result the signed backend stores is counted by the same script (no round trip of its
    own, :mod:`xnai_tasks.security.result_store`); the others are counted here after they ran.
    """

    def __init__(self) -> None:
        self._conn: redis.Redis | None = None
        self._pid = 0
        self._counted: set[str] = set()

    def key_for_result(self, task_id: str) -> str | None:
        """The bucket to count the running task ``task_id`` in, with its final result; None when not ours."""
        from celery import current_task

        request = getattr(current_task, "request", None)
        if getattr(request, "id", None) != task_id:
            return None
        role = c.role_of_task(str(getattr(current_task, "name", "")))
        return c.throughput_key(role, bucket_of(time.time())) if role in c.ROLES else None

    def counted_with_result(self, task_id: str) -> None:
        """The task was counted with its final result: :meth:`record` leaves it."""
        self._counted.add(task_id)

    def record(self, task: Any) -> None:
        """Count one ended task of the role the task belongs to (unless counted with its result)."""
        task_id = getattr(getattr(task, "request", None), "id", None)
        if task_id in self._counted:
            self._counted.discard(task_id)
            return
        role = c.role_of_task(str(getattr(task, "name", "")))
        if role not in c.ROLES:
            return
        try:
            conn = self._connection(str(task.app.conf.broker_url))
            key = c.throughput_key(role, bucket_of(time.time()))
            pipe = conn.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, BUCKET_TTL_S)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:  # a lost count only makes a retry-after less exact
            log.debug("could not count an ended task of %s: %s", role, exc)

    def _connection(self, url: str) -> redis.Redis:
        if self._conn is None or self._pid != os.getpid():
            from xnai_tasks.core import broker

            self._conn, self._pid = broker.connect(url, timeout=5.0), os.getpid()
        return self._conn


#: This process's recorder.
recorder = ThroughputRecorder()


def on_task_postrun(sender: Any = None, **_: Any) -> None:
    """Celery's ``task_postrun``: count the ended task."""
    if sender is not None:
        recorder.record(sender)
