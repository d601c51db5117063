"""The signed result backend: every stored task result carries the producing worker's signature.

Each role stores its results in a namespace of its own; a result published on the channel counts only if
its signature is good. A task result is stored in one round trip (:mod:`.result_store`): the replay ledger's
"done" mark (:mod:`.ledger`) and the role's throughput count ride in the same script.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend, ResultConsumer
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from xnai_tasks.admission.throughput import BUCKET_TTL_S, recorder
from xnai_tasks.core import constants as c
from xnai_tasks.errors import ResultSignatureError
from xnai_tasks.resilience.dead_workers import own_fence, this_instance
from xnai_tasks.security.keyring import shared_keyring
from xnai_tasks.security.ledger import finisher, running_nonce_key
from xnai_tasks.security.publish import process_source
from xnai_tasks.security.result_signature import sign_result, verify_result
from xnai_tasks.security.result_store import Outcome, ResultStore, Riders
from xnai_tasks.security.signature import SIG_HEADER

log = logging.getLogger(__name__)

#: Where a result's meta says who signed it, once :meth:`SignedRedisBackend.decode_authentic` checked it.
VERIFIED = "xnai_verified"


@dataclass(frozen=True)
class VerifiedBy:
    """The agent whose signature over a result was checked in this process."""

    agent: str


class VerifyingResultConsumer(ResultConsumer):  # type: ignore[misc]
    """Celery's result consumer, but a published result counts only if its signature is good, and it
    listens on every role's channel of a task a reader waits for (see :meth:`SignedRedisBackend.result_keys`).

    It outlives a Redis restart. Celery retries a lost pub/sub connection for a few seconds, then gives up for
    good ("must be restarted", also from ``AsyncResult.__del__`` at exit). Here a lost connection drops the
    pub/sub and the error goes to the caller, who decides how long to wait (``TaskHandle.get``: within its
    timeout); the next drain or subscribe subscribes again to every channel still wanted, and after any
    reconnect (ours, or redis-py's own) the results stored meanwhile are read, since nobody heard them published.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._decode_result = self._decode_wanted
        self._stopped = False
        self._catch_up = False

    def _decode_wanted(self, payload: Any) -> Any:
        """A published result, authentic; a state that is not final only when a waiter listens for states
        (``on_message``): nobody else uses one, so its signature is not checked and it counts as "not yet"."""
        return self.backend.decode_authentic(payload, interim=self.on_message is not None)

    @contextlib.contextmanager
    def reconnect_on_error(self) -> Iterator[None]:
        try:
            yield
        except TimeoutError:  # a poll that timed out, not a lost connection
            raise
        except self._connection_errors:
            self._drop_pubsub()
            raise

    def start(self, initial_task_id: Any, **kwargs: Any) -> None:
        super().start(initial_task_id, **kwargs)
        self._watch_reconnects()

    def consume_from(self, task_id: Any) -> None:
        if self._pubsub is None and self.subscribed_to:
            self._resubscribe()
        super().consume_from(task_id)

    def drain_events(self, timeout: float | None = None) -> None:
        if self._pubsub is None and self.subscribed_to:
            self._resubscribe()
        self._read_stored_after_reconnect()
        super().drain_events(timeout)
        self._read_stored_after_reconnect()

    def _resubscribe(self) -> None:
        """A new pub/sub on every channel still wanted; what was stored meanwhile is read next."""
        with self._locked():
            self._drop_pubsub()
            self.subscribed_to -= self._pending_unsubscribe
            self._pending_unsubscribe.clear()
            pubsub = self.backend.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*sorted(self.subscribed_to))
            except BaseException:
                with contextlib.suppress(Exception):
                    pubsub.reset()
                raise
            self._pubsub = pubsub
            self._watch_reconnects()
            self._catch_up = True

    def _watch_reconnects(self) -> None:
        connection = getattr(self._pubsub, "connection", None)
        if connection is not None:
            connection.register_connect_callback(self._on_reconnect)

    def _on_reconnect(self, connection: Any) -> None:
        self._catch_up = True  # redis-py subscribed again by itself: results published meanwhile went unheard

    def _read_stored_after_reconnect(self) -> None:
        """After a reconnect: the stored state of every task waited on (subscribed first, so none slips between)."""
        if not self._catch_up:
            return
        keys = sorted(self.subscribed_to)
        stored = self.backend.client.mget(keys) if keys else []
        self._catch_up = False
        for raw in stored:
            if raw:
                self.on_state_change(self._decode_result(raw), None)

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is None:
            return
        connection = getattr(pubsub, "connection", None)
        with contextlib.suppress(Exception):
            if connection is not None:
                connection.deregister_connect_callback(self._on_reconnect)
            pubsub.reset()

    def _consume_from(self, task_id: Any) -> None:
        for key in self.backend.result_keys(task_id):
            self._pending_unsubscribe.discard(key)
            if key not in self.subscribed_to:
                self.subscribed_to.add(key)
                with self.reconnect_on_error():
                    self._pubsub.subscribe(key)

    def cancel_for(self, task_id: Any) -> None:
        keys = self.backend.result_keys(task_id)
        if self._stopped:  # a handle collected after its client closed: nothing to tell a server gone
            self.subscribed_to.difference_update(keys)
            return
        self._pending_unsubscribe.update(keys)
        # The broker gone, so is the subscription (a new one subscribes only what is still wanted): never an
        # error here, which runs from AsyncResult.__del__, at interpreter exit too.
        with contextlib.suppress(*self._connection_errors):
            self._flush_pending_unsubscribe()

    def stop(self) -> None:
        self._stopped = True
        super().stop()


#: Task ids a client remembers the role of (the oldest are forgotten first; they are then read in every namespace).
EXPECTED_MAX = 100_000


class SignedRedisBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, but every stored task result carries the producing worker's signature.

    Each role stores its results in a namespace of its own (:func:`xnai_tasks.core.constants.result_key`),
    the only result keys its ACL lets it write; the copilot (and a client, Flower, the operator) reads
    every role's. A role keeps no chord counters: chords are joined by the copilot, which polls their
    header results (Celery's ``celery.chord_unlock``, sent to the copilot's queue).

    A signed task result is stored by one script (:mod:`.result_store`): Celery's "keep a stored success"
    read, the write and the publish, and with the final state the task's nonce marked done and its end
    counted, in one round trip instead of three.
    """

    ResultConsumer = VerifyingResultConsumer

    def __init__(self, *args: Any, url: str | None = None, **kwargs: Any) -> None:
        # The app names this class itself (core.celery_app.XnaiCelery), so Celery passes no URL: the
        # configured ``result_backend`` (a broker-style URL) is the one to connect to.
        app = kwargs.get("app")
        if url is None and app is not None and app.conf.result_backend:
            url = redis_backend_url(str(app.conf.result_backend))
        super().__init__(*args, url=url, **kwargs)
        #: What rides with the signed result this thread is storing (None: a plain store, Celery's own).
        self._riding = threading.local()

    @cached_property
    def _result_store(self) -> ResultStore:
        return ResultStore(self.client)

    @cached_property
    def writer_role(self) -> str:
        """The role whose namespace this process stores results in (the copilot's unless it is a role worker)."""
        role = self.app.conf.get("xnai_result_role")
        return str(role) if role in c.ROLES else "copilot"

    @cached_property
    def reads_every_role(self) -> bool:
        """A role worker reads only its own results (its ACL allows no more); everyone else reads all."""
        return self.writer_role not in c.WORKER_ROLES

    def get_key_for_task(self, task_id: Any, key: Any = "") -> str:
        """The key this process stores a task's result under: in its own role's namespace."""
        if not task_id:
            raise ValueError(f"task_id must not be empty. Got {task_id} instead.")
        return c.result_key(self.writer_role, _text(task_id)) + _text(key)

    def expect(self, task_id: str, role: str) -> None:
        """Read ``task_id``'s result from ``role``'s namespace only (a client knows where it sent a task)."""
        expected = self._expected
        expected[task_id] = role
        while len(expected) > EXPECTED_MAX:
            del expected[next(iter(expected))]

    @cached_property
    def _expected(self) -> dict[str, str]:
        return {}

    def result_keys(self, task_id: Any) -> list[str]:
        """Every key a result of ``task_id`` may be stored under that this process may read."""
        if not self.reads_every_role:
            return [self.get_key_for_task(task_id)]
        role = self._expected.get(_text(task_id))
        if role is not None:
            return [c.result_key(role, _text(task_id))]
        return [c.result_key(role, _text(task_id)) for role in c.ROLES]

    def mark_as_revoked(
        self, task_id: Any, reason: str = "", request: Any = None, store_result: bool = True, state: str = "REVOKED"
    ) -> Any:
        """Celery's remote ``revoke`` marks a task it does not run revoked from every worker; here only the
        worker whose request it is records it (when it runs or receives the message), in its own namespace."""
        return super().mark_as_revoked(
            task_id, reason, request=request, store_result=store_result and request is not None, state=state
        )

    def get(self, key: Any) -> Any:
        return self.mget([key])[0]

    def mget(self, keys: Any) -> list[Any]:
        """Celery reads a task's result by its own key: a reader looks in every role's namespace."""
        keys = list(keys)
        own = c.result_key(self.writer_role, "")
        if not self.reads_every_role or not any(_text(k).startswith(own) for k in keys):
            return list(super().mget(keys))
        wanted = [self.result_keys(_text(k)[len(own) :]) if _text(k).startswith(own) else [k] for k in keys]
        values = iter(super().mget([k for group in wanted for k in group]))
        return [_latest([next(values) for _ in group]) for group in wanted]

    def set_chord_size(self, group_id: Any, chord_size: int) -> None:
        """No counters: the copilot's polling needs none (see :meth:`apply_chord`)."""

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        """Join the chord by polling from the copilot's queue, so role workers never write chord keys."""
        self.ensure_chords_allowed()
        header_result = self.app.GroupResult(*header_result_args)
        countdown = kwargs.pop("countdown", 1) or 1
        kwargs["result"] = [r.as_tuple() for r in header_result]
        copilot = c.queue_for("copilot")
        self.app.tasks["celery.chord_unlock"].apply_async(
            (header_result.id, body), kwargs, countdown=countdown, queue=copilot, routing_key=copilot
        )

    def on_chord_part_return(self, request: Any, state: Any, result: Any, **kwargs: Any) -> None:
        """Nothing to count: the copilot polls the header's results."""

    def decode_authentic(self, payload: Any, *, interim: bool = True) -> Any:
        """A published (or, after a reconnect, re-read) result, if its signature is good; else "not yet".

        Anyone who may publish on the result channel (every role) could send a fake final state for a task
        a client waits on; such a message is ignored and the client goes on waiting for the real one.
        Which role must have signed it is the client's check (:class:`xnai_tasks.client.sync.TaskHandle`).
        Without ``interim`` a state that is not final is "not yet" unchecked (its reader has no use for it).
        """
        meta = self.decode(payload)
        if not interim and isinstance(meta, dict) and meta.get("status") not in states.READY_STATES:
            return {"status": states.PENDING, "result": None, "task_id": meta.get("task_id")}
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

    def store_refusal(self, task_id: str, error: BaseException, *, ttl_s: int) -> bool:
        """Fail ``task_id`` with ``error`` (its message was refused at the gate): signed by this worker's role key,
        in its own namespace, kept ``ttl_s`` at most, and published to a caller waiting on it.

        Only when this process signs as a role and the id has no result in its namespace yet: a refusal never
        overwrites a result (``SET NX``). True when it was stored.
        """
        source = process_source()
        if source is None or self.writer_role not in c.ROLES:
            return False
        meta = self._get_result_meta(
            result=self.encode_result(error, states.FAILURE), state=states.FAILURE, traceback=None, request=None
        )
        meta["task_id"] = task_id
        meta = json.loads(self.encode(meta))
        meta[SIG_HEADER] = sign_result(source.get(), task_id=task_id, status=states.FAILURE, result=meta["result"])
        value = json.dumps(meta)
        key = self.get_key_for_task(task_id)
        expires = min(int(ttl_s), int(self.expires)) if self.expires else int(ttl_s)
        if not self.client.set(key, value, nx=True, ex=expires):
            return False
        self.client.publish(key, value)
        return True

    def _store_result(
        self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        """Celery's, without its read of the stored result first when this process signs: the store script
        keeps a stored success itself, atomically and in the same round trip (:mod:`.result_store`)."""
        if process_source() is None:
            return super()._store_result(task_id, result, state, traceback=traceback, request=request, **kwargs)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = _text(task_id)
        try:
            self._set_with_state(self.get_key_for_task(task_id), self.encode(meta), state)
        except BackendStoreError as exc:
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        return result

    def _set_with_state(self, key: Any, value: Any, state: str) -> Any:
        source = process_source()
        name = _text(key)
        if source is None or not name.startswith(c.RESULT_KEY_PREFIX):
            return super()._set_with_state(key, value, state)
        meta = json.loads(value)
        task_id = str(meta.get("task_id"))
        meta[SIG_HEADER] = sign_result(
            source.get(), task_id=task_id, status=str(meta.get("status")), result=meta.get("result")
        )
        riders = _riders(task_id, state)
        self._riding.riders = riders
        try:
            stored = super()._set_with_state(key, json.dumps(meta), state)
        finally:
            self._riding.riders = None
        if riders.nonce_key is not None:
            finisher.finished_with_result(riders.nonce_key)
        if riders.count_key is not None:
            recorder.counted_with_result(task_id)
        return stored

    def _set(self, key: Any, value: Any, expires: int | None = None) -> None:
        """A signed task result by the store script (with what rides along); anything else as Celery does."""
        riders = getattr(self._riding, "riders", None)
        if riders is None:
            super()._set(key, value, expires)
            return
        outcome = self._result_store.outcome(_text(key), value, self.expires if expires is None else expires, riders)
        if outcome is Outcome.FENCED:
            instance = this_instance()
            log.warning(
                "not storing the result of task %s: its message was given to another worker after a peer declared "
                "this one (%s) dead",
                riders.task_id,
                instance.node if instance is not None else "?",
                extra={"event": "result_fenced", "task_id": riders.task_id},
            )


def _text(value: Any) -> str:
    return str(bytes_to_str(value))


def _riders(task_id: str, state: str) -> Riders:
    """With a final result: the task's nonce marked done, its end counted; with any state, whoever in this worker
    stores it (pool child or parent), this instance's fence checked first (a peer declared it dead, took the task)."""
    fence = own_fence()
    if state not in states.READY_STATES:
        return Riders(fence_key=fence, task_id=task_id)
    return Riders(
        nonce_key=running_nonce_key(task_id),
        count_key=recorder.key_for_result(task_id),
        count_ttl_s=BUCKET_TTL_S,
        fence_key=fence,
        task_id=task_id,
    )


def _latest(values: list[Any]) -> Any:
    """Of one task's results in several namespaces (only one, unless a role misbehaves): a final one first."""
    present = [v for v in values if v is not None]
    for value in present:
        try:
            if json.loads(value).get("status") in states.READY_STATES:
                return value
        except (ValueError, AttributeError):
            continue
    return present[0] if present else None


def redis_backend_url(broker_url: str) -> str:
    """The URL Celery's Redis result backend takes for a kombu broker URL (``redis+socket://`` -> ``socket://``)."""
    scheme, sep, rest = broker_url.partition("://")
    transport = scheme.split("+", 1)[1] if scheme.startswith("redis+") else scheme
    return f"{transport}{sep}{rest}"
