"""Where signing meets Celery: outgoing messages, stored results, and the replay ledger.

One agent identity per process: the copilot's key in a client, the role's key in a role worker (set
in the parent before the pool forks, so retries and subtasks sent from tasks are signed by the worker
that sent them). The verification side lives in :mod:`xnai_tasks.gate`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import current_task, signals, states
from celery.backends.redis import RedisBackend, ResultConsumer

from xnai_tasks import constants as c
from xnai_tasks.errors import ResultSignatureError
from xnai_tasks.keys import SignerSource, shared_keyring
from xnai_tasks.signing import SIG_HEADER, sign_message, sign_result, verify_result

log = logging.getLogger(__name__)

_state: dict[str, Any] = {"source": None, "ledger": None}

#: Values of a nonce's ledger entry: admitted and not finished, or finished.
NONCE_SEEN = b"seen"
NONCE_DONE = b"done"


#: A signer for the current context (a Client's submit), over the process default.
_context_source: ContextVar[SignerSource | None] = ContextVar("xnai_signer", default=None)


def load_agent(home: Path, agent: str) -> SignerSource:
    """The signing key source of ``agent`` under ``home``; the key is loaded now, so a bad one fails early."""
    source = SignerSource(home, agent)
    source.get()
    return source


def use_agent(home: Path, agent: str, *, default_only: bool = False) -> SignerSource:
    """Sign what this process sends (messages and results) as ``agent`` unless a context says otherwise.

    With ``default_only`` an existing process default is kept (a client does not take over a worker's key).
    """
    if default_only and _state["source"] is not None:
        return _state["source"]  # type: ignore[no-any-return]
    source = load_agent(home, agent)
    _state["source"] = source
    return source


@contextmanager
def signing_as(source: SignerSource) -> Iterator[None]:
    """Within the block, messages published by this thread are signed by ``source``."""
    token = _context_source.set(source)
    try:
        yield
    finally:
        _context_source.reset(token)


def current_source() -> SignerSource | None:
    """The signer of this thread's context (a client's submit), else the process's agent, else None."""
    return context_source() or process_source()


def context_source() -> SignerSource | None:
    """The signer set by :func:`signing_as` for this thread's context, if any."""
    return _context_source.get()


def process_source() -> SignerSource | None:
    """The agent this process signs as by default (a role worker's role), if any."""
    source: SignerSource | None = _state["source"]
    return source


@signals.before_task_publish.connect  # type: ignore[untyped-decorator]
def _sign_outgoing(
    body: Any = None, headers: dict[str, Any] | None = None, routing_key: str | None = None, **_: Any
) -> None:
    """Add the signature header to every task message this process publishes (retries re-sign)."""
    source = current_source()
    if source is None or headers is None:
        return  # unsigned: every worker refuses it
    headers[SIG_HEADER] = sign_message(source.get(), headers=headers, body=body, queue=routing_key or "")


#: Where a result's meta says who signed it, once :meth:`SignedRedisBackend.decode_authentic` checked it.
VERIFIED = "xnai_verified"


@dataclass(frozen=True)
class VerifiedBy:
    """The agent whose signature over a result was checked in this process."""

    agent: str


class VerifyingResultConsumer(ResultConsumer):  # type: ignore[misc]
    """Celery's result consumer, but a published result counts only if its signature is good."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._decode_result = self.backend.decode_authentic


class SignedRedisBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, but every stored task result carries the producing worker's signature.

    When a task's final state is stored, the same pipeline also marks its nonce done (see
    :func:`finish_nonce`), saving the replay ledger a round trip per task.
    """

    ResultConsumer = VerifyingResultConsumer

    def decode_authentic(self, payload: Any) -> Any:
        """A published (or, after a reconnect, re-read) result, if its signature is good; else "not yet".

        Anyone who may publish on the result channel (every role) could send a fake final state for a task
        a client waits on; such a message is ignored and the client goes on waiting for the real one.
        Which role must have signed it is the client's check (:class:`xnai_tasks.client.TaskHandle`).
        """
        meta = self.decode(payload)
        home = self.app.conf.get("xnai_home")
        if home is not None and isinstance(meta, dict) and meta.get("status") != states.PENDING:
            try:
                verify_result(
                    shared_keyring(Path(str(home))),
                    task_id=meta.get("task_id"),
                    status=meta.get("status"),
                    result=meta.get("result"),
                    signature=meta.get(SIG_HEADER),
                )
            except ResultSignatureError as exc:
                log.warning("ignored a published result that is not authentic: %s", exc)
                return {"status": states.PENDING, "result": None, "task_id": meta.get("task_id")}
            # An object no JSON can spell: a stored value cannot claim to have been verified.
            meta[VERIFIED] = VerifiedBy(str(meta[SIG_HEADER]["agent"]))
        return self.meta_from_decoded(meta)

    def _set_with_state(self, key: Any, value: Any, state: str) -> Any:
        source = _state["source"]
        name = key.decode() if isinstance(key, bytes) else str(key)
        if source is None or not name.startswith(c.RESULT_KEY_PREFIX):
            return super()._set_with_state(key, value, state)
        meta = json.loads(value)
        meta[SIG_HEADER] = sign_result(
            source.get(), task_id=str(meta.get("task_id")), status=str(meta.get("status")), result=meta.get("result")
        )
        _finishing.nonce = _running_nonce_key(str(meta.get("task_id"))) if state in states.READY_STATES else None
        try:
            return super()._set_with_state(key, json.dumps(meta), state)
        finally:
            _finishing.nonce = None

    def _set(self, key: Any, value: Any, expires: int | None = None) -> None:
        """Store and publish the result, and mark the task's nonce done, in one pipeline."""
        expires = self.expires if expires is None else expires
        with self.client.pipeline() as pipe:
            if expires:
                pipe.setex(key, expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
            nonce_key = _finishing.nonce
            if nonce_key is not None:
                pipe.set(nonce_key, NONCE_DONE, xx=True, keepttl=True)
            pipe.execute()
        if nonce_key is not None:
            _finished_nonces.add(nonce_key)


#: The nonce whose task's final result is being stored by this thread, if any.
_finishing = threading.local()
_finishing.nonce = None
#: Nonces already marked done together with their result (so task_postrun need not do it again).
_finished_nonces: set[str] = set()


def _running_nonce_key(task_id: str) -> str | None:
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
    return c.nonce_key(name.split(".", 1)[0], nonce)


def result_backend_url(broker_url: str) -> str:
    """The ``result_backend`` setting that selects :class:`SignedRedisBackend` for a Redis URL."""
    scheme, sep, rest = broker_url.partition("://")
    transport = scheme.split("+", 1)[1] if scheme.startswith("redis+") else scheme
    return f"{__name__}:SignedRedisBackend+{transport}{sep}{rest}"


# ---- replay ledger ----


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


@signals.task_postrun.connect  # type: ignore[untyped-decorator]
def _finish_task(sender: Any = None, **_: Any) -> None:
    """After a task ran (in the pool child), its nonce becomes ``done``: any later copy is a replay."""
    nonce_key = _nonce_key_of(sender)
    if nonce_key is None:
        return
    if nonce_key in _finished_nonces:  # done already, with the result
        _finished_nonces.discard(nonce_key)
        return
    ledger = _state["ledger"]
    if ledger is None:
        from xnai_tasks import broker

        ledger = _state["ledger"] = broker.connect(sender.app.conf.broker_url, timeout=5.0)
    try:
        finish_nonce(ledger, nonce_key)
    except redis.RedisError as exc:
        log.warning("could not mark nonce done for %s: %s", sender.request.id, exc)
