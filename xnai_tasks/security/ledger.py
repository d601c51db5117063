"""The replay ledger: a message's nonce is claimed when it is admitted and marked done when its task ends.

Keys are per role (``xnai:nonce:ROLE:NONCE``, :func:`xnai_tasks.core.constants.nonce_key`), so only the role
that consumed a message (its ACL user) can touch its nonce. The gate claims (:func:`claim_nonce`); the
result backend marks a task's nonce done in the script that stores its final result
(:mod:`.result_store`, telling this process's :class:`NonceFinisher`); ``task_postrun`` marks it otherwise
(:func:`finish_task`).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import current_task

from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected
from xnai_tasks.security.refusal import Reason
from xnai_tasks.security.signature import SIG_HEADER

log = logging.getLogger(__name__)

#: Values of a nonce's ledger entry: admitted and not finished, or finished.
NONCE_SEEN = b"seen"
NONCE_DONE = b"done"


def running_nonce_key(task_id: str) -> str | None:
    """The ledger key of the nonce of the task this process is running, if ``task_id`` is that task."""
    task = current_task
    request = getattr(task, "request", None)
    if getattr(request, "id", None) != task_id:
        return None
    return _nonce_key_of(task)


def _nonce_key_of(task: Any) -> str | None:
    """The ledger key of a running task's nonce: its role (the task name's prefix) and its signed nonce."""
    signature = getattr(getattr(task, "request", None), SIG_HEADER, None)
    nonce = signature.get("nonce") if isinstance(signature, dict) else None
    name = getattr(task, "name", None)
    if not isinstance(nonce, str) or not isinstance(name, str):
        return None
    return c.nonce_key(c.role_of_task(name), nonce)


def claim_nonce(conn: redis.Redis, role: str, nonce: str, ttl_s: int, *, redelivered: bool) -> None:
    """Record a nonce as admitted, so the message may run; :class:`MessageRejected` (``replay``) if it is a replay.

    A nonce is ``seen`` from admission until its task finishes, then ``done``, for the maximum message
    age. A copy of a finished message is a replay; so is a second copy of one still in flight, unless the
    broker marked it redelivered (kombu does when a lost worker's message is restored or requeued).
    """
    key = c.nonce_key(role, nonce)
    if conn.set(key, NONCE_SEEN, nx=True, ex=ttl_s):
        return
    judge_claim(False, conn.get(key), redelivered=redelivered)


def queue_claim(pipe: Any, key: str, ttl_s: int) -> None:
    """Add a nonce's claim to a pipeline: two replies, whether it was claimed and its state (:func:`judge_claim`)."""
    pipe.set(key, NONCE_SEEN, nx=True, ex=ttl_s)
    pipe.get(key)


def judge_claim(claimed: Any, state: Any, *, redelivered: bool) -> None:
    """The verdict of :func:`claim_nonce` from its replies: nothing, or :class:`MessageRejected` (``replay``)."""
    if claimed:
        return
    if state == NONCE_SEEN and redelivered:
        return
    detail = "nonce already used by a finished task" if state == NONCE_DONE else "nonce already in flight"
    raise MessageRejected(Reason.REPLAY, detail)


def finish_nonce(conn: redis.Redis, nonce_key: str) -> None:
    """Mark a nonce's task finished (whatever its outcome), keeping its time to live."""
    conn.set(nonce_key, NONCE_DONE, xx=True, keepttl=True)


class NonceFinisher:
    """This process's side of marking nonces done: with the final result, or after the task.

    The result backend marks a running task's nonce (:func:`running_nonce_key`) done in the script that stores
    its final result and says so (:meth:`finished_with_result`); ``task_postrun`` then has nothing left to do.
    A task whose result is not stored that way (ignored results, a failure before storing) is marked by
    :meth:`after_task`.
    """

    def __init__(self) -> None:
        self._finished: set[str] = set()
        self._conn: redis.Redis | None = None

    def finished_with_result(self, nonce_key: str) -> None:
        """The nonce was marked done with the result."""
        self._finished.add(nonce_key)

    def after_task(self, task: Any) -> None:
        """After a task ran (in the pool child), its nonce becomes ``done``: any later copy is a replay."""
        nonce_key = _nonce_key_of(task)
        if nonce_key is None:
            return
        if nonce_key in self._finished:  # done already, with the result
            self._finished.discard(nonce_key)
            return
        if self._conn is None:
            from xnai_tasks.core import broker

            self._conn = broker.connect(task.app.conf.broker_url, timeout=5.0)
        try:
            finish_nonce(self._conn, nonce_key)
        except redis.RedisError as exc:
            log.warning("could not mark nonce done for %s: %s", task.request.id, exc)


#: This process's finisher (a pool child inherits an empty one: nothing is being stored at fork time).
finisher = NonceFinisher()


def finish_task(sender: Any = None, state: str | None = None, **_: Any) -> None:
    """Celery's ``task_postrun``: mark the task's nonce done unless its result already did.

    Not for a task with no outcome (``state`` None): its process was told to exit while it ran (Celery terminates
    the running tasks of a worker that lost its broker) and its message will be delivered again, which a done
    nonce would refuse as a replay.
    """
    if state is None:
        return
    finisher.after_task(sender)
