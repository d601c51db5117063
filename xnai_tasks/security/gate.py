"""The message gate: every task message is checked in the worker's consumer before anything runs.

A refused message is never executed and never silent: it is rejected without requeue, logged at
WARNING in one line (reason and message id, no body, no key material), counted per reason, and its
raw form is kept in a bounded dead-letter list of the role (``xnai status`` shows both).

Its sender and watchers hear of it too (:class:`RefusalNotice`), when its task id is a UUID as Celery makes
them: the worker sends Celery's ``task-rejected`` event (Flower shows the task rejected), and a message of
this worker's own role gets a FAILURE result signed by the worker, in its own namespace, whose error is one
fixed line naming the reason, so a caller waiting on the id is refused instead of waiting forever. Nothing
else of the message is stored: only its id and the worker's own reason. Storing is capped per role and
minute and the results expire (see :class:`RefusalNotice`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import redis
from celery.worker.consumer import Consumer
from kombu.message import Message

from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected
from xnai_tasks.security import limits
from xnai_tasks.security.keyring import Keyring, shared_keyring
from xnai_tasks.security.ledger import claim_nonce, judge_claim, queue_claim
from xnai_tasks.security.message_signature import Verified, nonce_ttl_s, verify_message
from xnai_tasks.security.refusal import Reason, show
from xnai_tasks.settings import Settings, process_settings
from xnai_tasks.worker.dead_letters import dead_letter
from xnai_tasks.worker.deliveries import DeliveryLedger

log = logging.getLogger(__name__)

#: The only task ids a refusal is announced for: a UUID as Celery and kombu make them (36 characters).
TASK_ID_PATTERN: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
#: At most this many refused messages of a role get a result per minute; the rest are dead-lettered and counted only.
REFUSAL_RESULTS_PER_MINUTE: Final = 100
#: How long a refusal result is kept (less when Celery's results expire sooner): a caller waits for seconds.
REFUSAL_RESULT_TTL_S: Final = 3600
#: Refusals that store no result: a replay carries the id of a real message, whose own result is coming or
#: stored; a message given up on after its workers died has its own signed failure (``worker/deliveries.py``).
NO_RESULT_REASONS: Final = frozenset({Reason.REPLAY, Reason.WORKER_LOST})


def announceable_id(value: Any) -> str | None:
    """``value`` when it is a task id a refusal may be announced for (:data:`TASK_ID_PATTERN`), else None."""
    if isinstance(value, str) and TASK_ID_PATTERN.fullmatch(value):
        return value
    return None


def refusal_error(role: str, reason: Reason) -> MessageRejected:
    """The error a refused message's result carries: the reason, and a line fixed by the worker."""
    return MessageRejected(
        reason, f"the {role} worker refused the message before it ran (xnai status --dead-letters {role})"
    )


class RefusalNotice:
    """Tells the sender and the watchers of a refused message that it was refused.

    Only the message's task id (a UUID, :func:`announceable_id`) and the worker's own reason are used:

    * Celery's ``task-rejected`` event with ``uuid``, ``reason`` and ``requeue=False``, as Celery's own
      request sends when it rejects a message (Flower shows the task REJECTED); events are not stored.
    * A FAILURE result (:func:`refusal_error`) signed by this worker's role key, in its own namespace, when the
      task belongs to this worker's role (where its caller looks) and that id has no result there yet (a
      refusal never overwrites a result). Bounded: at most :data:`REFUSAL_RESULTS_PER_MINUTE` per role and
      minute (a fixed-window counter, ``xnai:refusal-results:ROLE:MINUTE``), each expiring after
      :data:`REFUSAL_RESULT_TTL_S`: a flood of refused messages holds at most 6,000 small results per role.
    """

    def __init__(self, conn: redis.Redis, backend: Any, events: Callable[[], Any]) -> None:
        self._redis = conn
        self.backend = backend
        self._events = events

    def announce(self, headers: dict[str, Any], reason: str) -> None:
        """Send the event and store the refusal result of a refused message's headers, when allowed."""
        task_id = announceable_id(headers.get("id"))
        if task_id is None or reason not in set(Reason):
            return
        known = Reason(reason)
        dispatcher = self._events()
        if dispatcher is not None:
            dispatcher.send("task-rejected", uuid=task_id, reason=known.value, requeue=False)
        task = headers.get("task")
        role = getattr(self.backend, "writer_role", None)
        if known in NO_RESULT_REASONS or not isinstance(task, str) or c.role_of_task(task) != role:
            return
        if self._within_cap(str(role)):
            self.backend.store_refusal(task_id, refusal_error(str(role), known), ttl_s=REFUSAL_RESULT_TTL_S)

    def _within_cap(self, role: str) -> bool:
        minute = int(time.time() // 60)
        key = c.refusal_results_key(role, minute)
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 2 * 60)
        count = int(pipe.execute()[0])
        if count == REFUSAL_RESULTS_PER_MINUTE + 1:
            log.warning(
                "%s: more than %d refused messages this minute: the others get no result (dead-lettered only)",
                role,
                REFUSAL_RESULTS_PER_MINUTE,
                extra={"event": "refusal_results_capped", "role": role},
            )
        return count <= REFUSAL_RESULTS_PER_MINUTE


def check_deadline(headers: dict[str, Any], now: float) -> None:
    """Refuse (``deadline``) a message whose signed ``expires`` has passed: nobody waits for its result any more."""
    expires = headers.get("expires")
    if not expires:
        return
    try:
        deadline = datetime.fromisoformat(str(expires))
    except ValueError:
        raise MessageRejected(Reason.MALFORMED, f"expires {show(expires)} is not an ISO 8601 time") from None
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=UTC)
    late = now - deadline.timestamp()
    if late > 0:
        raise MessageRejected(Reason.DEADLINE, f"its expires passed {late:.1f} s before a worker took it; not run")


def check_role(headers: dict[str, Any], queues: frozenset[str]) -> str:
    """The role of the message's task, which must be one whose queue this worker consumes (``cline.*`` only
    from ``cline``); :class:`MessageRejected` otherwise."""
    task = headers.get("task")
    if not isinstance(task, str) or "." not in task:
        raise MessageRejected(Reason.MALFORMED, "no task name in the headers")
    role = c.role_of_task(task)
    if role not in queues:
        raise MessageRejected(
            Reason.WRONG_QUEUE, f"task {task} does not belong to the queue(s) {', '.join(sorted(queues))}"
        )
    return role


@dataclass(slots=True)
class Verdict:
    """What :meth:`MessageGate.take` found of a message: its refusal, or what it proved and the claim of its nonce
    (key, time to live), whose two replies (:func:`~.ledger.queue_claim`) are set when the claim was sent."""

    refusal: MessageRejected | None = None
    verified: Verified | None = None
    redelivered: bool = False
    claim: tuple[str, int] | None = None
    replies: tuple[Any, Any] | None = None

    def queue_claim(self, pipe: Any) -> bool:
        """Add the nonce's claim to ``pipe``: True when it was (its two replies come last, for :meth:`claimed`)."""
        if self.claim is None:
            return False
        queue_claim(pipe, *self.claim)
        return True

    def claimed(self, replies: list[Any]) -> None:
        """The replies of a pipeline :meth:`queue_claim` added to."""
        self.replies = (replies[-2], replies[-1])


class _Current:
    """The gate of this worker's task consumer, which its channel's QoS asks to :meth:`~MessageGate.take` a message."""

    def __init__(self) -> None:
        self.gate: MessageGate | None = None


current = _Current()


def take(message: Message) -> Verdict | None:
    """The current gate's verdict on a message being taken; None when this process has no gate."""
    gate = current.gate
    return gate.take(message) if gate is not None else None


class MessageGate:
    """Checks a message before anything runs, and refuses it loudly when a check fails.

    Checks, in order: the task belongs to a consumed queue; the Ed25519 signature over body and headers
    is valid, by a known, unrevoked key that may dispatch this task to this role, not too old, not from
    the future; its ``expires`` has not passed (deadline); the nonce was not used before (replay).
    """

    def __init__(
        self,
        settings: Settings,
        queues: frozenset[str],
        keyring: Keyring,
        redis_url: str,
        backend: Any = None,
        events: Callable[[], Any] = lambda: None,
    ) -> None:
        self.settings = settings
        self.queues = queues
        self.keyring = keyring
        self.nonce_ttl_s = nonce_ttl_s(settings.max_message_age)
        self._redis = broker.connect(redis_url, timeout=5.0)
        #: Where a message given up on (worker_lost) gets its signed FAILURE result, and a refused one its refusal.
        self.backend = backend
        #: Tells the sender and the watchers (``events`` gives the worker's event dispatcher, if any).
        self.notice = RefusalNotice(self._redis, backend, events)
        self._ledgers: dict[str, DeliveryLedger] = {}
        #: The message :meth:`take` verified last, and its verdict (used by :meth:`check` for that message only).
        self._taken: tuple[Message, Verdict] | None = None

    def admit(self, message: Message) -> bool:
        """True when the message may run; otherwise it has been refused and rejected."""
        try:
            self.check(message)
        except MessageRejected as refusal:
            self.refuse(message, refusal)
            return False
        return True

    def check(self, message: Message) -> Verified:
        """What the message proved, when it may run; :class:`MessageRejected` saying why not otherwise.

        Verified once: when :meth:`take` saw it already (as it was recorded unacked, its nonce claimed in the same
        round trip), its verdict is used; otherwise it is verified and its nonce claimed here.
        """
        taken, self._taken = self._taken, None
        verdict = taken[1] if taken is not None and taken[0] is message else None
        if verdict is not None and verdict.refusal is not None:
            raise verdict.refusal
        if verdict is not None and verdict.verified is not None:
            verified, redelivered = verdict.verified, verdict.redelivered
        else:
            verified, redelivered = self.verify(message)
        # checked first: a copy of a finished message never touches its result
        if verdict is not None and verdict.replies is not None:
            judge_claim(*verdict.replies, redelivered=redelivered)
        else:
            claim_nonce(self._redis, verified.role, verified.nonce, self.nonce_ttl_s, redelivered=redelivered)
        if redelivered:
            self._check_deliveries(verified.role, message.headers)
        return verified

    def verify(self, message: Message) -> tuple[Verified, bool]:
        """Every check but the nonce's: what the message proved, and whether it was redelivered."""
        headers = message.headers
        if not isinstance(headers, dict):
            raise MessageRejected(Reason.MALFORMED, "headers are not a mapping")
        role = check_role(headers, self.queues)
        verified = verify_message(
            self.keyring,
            headers=headers,
            body=_decoded_body(message),
            queue=role,
            now=time.time(),
            max_age_s=self.settings.max_message_age,
            role=role,
        )
        check_deadline(headers, time.time())  # after the signature: expires is one of the signed headers
        return verified, bool(headers.get("redelivered") or message.delivery_info.get("redelivered"))

    def take(self, message: Message) -> Verdict:
        """Verify a message as it is taken, before it is recorded as unacked (kombu then hands it to :meth:`admit`
        at once): its :class:`Verdict`, whose nonce claim rides in that record's round trip. Never raises."""
        try:
            verified, redelivered = self.verify(message)
        except MessageRejected as refusal:
            verdict = Verdict(refusal=refusal)
        except Exception:  # left to check(), which fails as it always did
            verdict = Verdict()
        else:
            key = c.nonce_key(verified.role, verified.nonce)
            verdict = Verdict(verified=verified, redelivered=redelivered, claim=(key, self.nonce_ttl_s))
        self._taken = (message, verdict)
        return verdict

    def _check_deliveries(self, role: str, headers: dict[str, Any]) -> None:
        """A redelivered message past ``XNAI_MAX_DELIVERIES`` (its workers kept dying): refuse it as worker_lost."""
        ledger = self._ledger(role)
        task_id = str(headers.get("id"))
        retries = headers.get("retries")
        counted = ledger.count_redelivery(task_id, retries if isinstance(retries, int) else 0)
        if counted.deliveries <= ledger.max_deliveries:
            return
        line = ledger.exhausted_line(
            str(headers["task"]), task_id, counted.deliveries - 1, counted.deaths, counted.cause
        )
        raise MessageRejected(Reason.WORKER_LOST, line)

    def _ledger(self, role: str) -> DeliveryLedger:
        if role not in self._ledgers:
            self._ledgers[role] = DeliveryLedger(
                self._redis, role, max_deliveries=self.settings.max_deliveries, ttl_s=self.settings.max_message_age
            )
        return self._ledgers[role]

    def refuse(self, message: Message, refusal: MessageRejected) -> None:
        """Reject without requeue, log one WARNING line, count it, keep the raw message, then announce it."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id = str(headers.get("id", "?"))[:64]
        role = _role_of(headers, self.queues)
        log.warning(
            "refused message %s (%s): %s",
            task_id,
            refusal.reason,
            refusal.detail,
            extra={"event": "message_refused", "reason": refusal.reason, "task_id": task_id, "role": role},
        )
        if refusal.reason == Reason.WORKER_LOST and self.backend is not None:
            self._ledger(role).finalize(
                self.backend,
                line=refusal.detail,
                task_id=task_id,
                headers=headers,
                delivery_info=dict(message.delivery_info),
                body=message.body,
            )
        else:
            dead_letter(
                self._redis,
                role,
                reason=refusal.reason,
                detail=refusal.detail,
                task_id=task_id,
                headers=headers,
                delivery_info=dict(message.delivery_info),
                body=message.body,
            )
        message.reject(requeue=False)
        try:
            self.notice.announce(headers, refusal.reason)
        except Exception as exc:  # the refusal stands; only its announcement is lost
            log.warning("could not announce the refusal of %s: %s", task_id, exc)


class GatedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer with the message gate in front of every task message.

    Its connection pops queue items through :class:`xnai_tasks.security.envelope.GuardedChannel`, which refuses
    an item that is not a well-formed envelope before kombu builds a message of it.
    """

    def connection_for_read(self, heartbeat: Any = None) -> Any:
        from xnai_tasks.security.envelope import guard

        return self.ensure_connected(guard(self.app.connection_for_read(heartbeat=heartbeat)))

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Message], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        settings = process_settings()
        gate = MessageGate(
            settings,
            consumed_queues(self.app),
            shared_keyring(settings.home),
            str(self.app.conf.broker_url),
            backend=self.app.backend,
            events=lambda: self.event_dispatcher,
        )
        current.gate = gate

        def on_task_received(message: Message) -> Any:
            if gate.admit(message):
                return handle(message)
            return None

        return on_task_received


def _decoded_body(message: Message) -> Any:
    """The message's decoded body, if it is small enough, decodes, and nests no deeper than allowed."""
    raw = message.body
    if isinstance(raw, bytes | bytearray | str) and len(raw) > limits.MAX_BODY_BYTES:
        raise MessageRejected(Reason.MALFORMED, f"body is {len(raw)} bytes, more than {limits.MAX_BODY_BYTES}")
    try:
        body = message.decode()
    except Exception as exc:  # any undecodable body is a refusal, never a crash of the consumer
        raise MessageRejected(Reason.MALFORMED, f"body does not decode: {type(exc).__name__}") from None
    wrapped = limits.MAX_DEPTH + 1  # protocol 2 wraps the arguments in [args, kwargs, embed]
    if limits.depth(body, wrapped) > wrapped:
        raise MessageRejected(Reason.MALFORMED, f"arguments nest more than {limits.MAX_DEPTH} levels deep")
    return body


def consumed_queues(app: Any) -> frozenset[str]:
    """Names of the queues this worker consumes (``-Q``), or every queue when none was named."""
    names = app.amqp.queues.consume_from or app.amqp.queues
    return frozenset(str(name) for name in names)


def _role_of(headers: dict[str, Any], queues: frozenset[str]) -> str:
    task = headers.get("task")
    role = c.role_of_task(task) if isinstance(task, str) else ""
    if role in queues:
        return role
    return sorted(queues)[0] if len(queues) == 1 else "unknown"
