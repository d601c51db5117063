"""The replay ledger: a message's nonce is claimed when it is admitted and marked done when its task ends.

Keys are per role (``xnai:nonce:ROLE:NONCE``, :func:`xnai_tasks.core.constants.nonce_key`), so only the role
that consumed a message (its ACL user) can touch its nonce. The gate claims (:func:`claim_nonce`); the
result backend marks a task's nonce done in the pipeline that stores its final result
(:data:`finishing`); ``task_postrun`` marks it otherwise (:func:`finish_task`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import current_task

from xnai_tasks.core import constants as c
from xnai_tasks.security.signing import SIG_HEADER

log = logging.getLogger(__name__)

#: Values of a nonce's ledger entry: admitted and not finished, or finished.
NONCE_SEEN = b"seen"
NONCE_DONE = b"done"

#: The nonce whose task's final result is being stored by this thread, if any.
finishing = threading.local()
finishing.nonce = None
#: Nonces already marked done together with their result (so task_postrun need not do it again).
finished_nonces: set[str] = set()
#: This pool process's connection for marking nonces done (made on first use).
_connection: dict[str, redis.Redis | None] = {"ledger": None}


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


def claim_nonce(conn: redis.Redis, role: str, nonce: str, ttl_s: int, *, redelivered: bool) -> str | None:
    """Record a nonce as admitted. Returns None when the message may run, else why it is a replay.

    A nonce is ``seen`` from admission until its task finishes, then ``done``, for the maximum message
    age. A copy of a finished message is a replay; so is a second copy of one still in flight, unless the
    broker marked it redelivered (kombu does when a lost worker's message is restored or requeued).
    """
    key = c.nonce_key(role, nonce)
    if conn.set(key, NONCE_SEEN, nx=True, ex=ttl_s):
        return None
    state = conn.get(key)
    if state == NONCE_SEEN and redelivered:
        return None
    return "nonce already used by a finished task" if state == NONCE_DONE else "nonce already in flight"


def finish_nonce(conn: redis.Redis, nonce_key: str) -> None:
    """Mark a nonce's task finished (whatever its outcome), keeping its time to live."""
    conn.set(nonce_key, NONCE_DONE, xx=True, keepttl=True)


def finish_task(sender: Any = None, **_: Any) -> None:
    """After a task ran (in the pool child), its nonce becomes ``done``: any later copy is a replay."""
    nonce_key = _nonce_key_of(sender)
    if nonce_key is None:
        return
    if nonce_key in finished_nonces:  # done already, with the result
        finished_nonces.discard(nonce_key)
        return
    ledger = _connection["ledger"]
    if ledger is None:
        from xnai_tasks.core import broker

        ledger = _connection["ledger"] = broker.connect(sender.app.conf.broker_url, timeout=5.0)
    try:
        finish_nonce(ledger, nonce_key)
    except redis.RedisError as exc:
        log.warning("could not mark nonce done for %s: %s", sender.request.id, exc)
