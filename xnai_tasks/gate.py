"""The message gate: every task message is checked in the worker's consumer before anything runs.

A refused message is never executed and never silent: it is rejected without requeue, logged at
WARNING in one line (reason and message id, no body, no key material), counted per reason, and its
raw form is kept in a bounded dead-letter list of the role (``xnai status`` shows both).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.worker.consumer import Consumer
from kombu.message import Message

from xnai_tasks import broker
from xnai_tasks import constants as c
from xnai_tasks.settings import Settings

log = logging.getLogger(__name__)

#: Raw bodies longer than this are cut in the dead-letter entry.
DEAD_LETTER_BODY_MAX = 64 * 1024


@dataclass(frozen=True)
class Refusal:
    """Why a message was refused: a reason code (the counter's name) and one line of detail."""

    reason: str
    detail: str


Check = Callable[[Message, frozenset[str]], Refusal | None]


def check_role(message: Message, queues: frozenset[str]) -> Refusal | None:
    """The task must belong to a role whose queue this worker consumes (``cline.*`` only from ``cline``)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task = headers.get("task")
    if not isinstance(task, str) or "." not in task:
        return Refusal("malformed", "no task name in the headers")
    role = task.split(".", 1)[0]
    if role not in queues:
        return Refusal("wrong_queue", f"task {task} does not belong to the queue(s) {', '.join(sorted(queues))}")
    return None


class MessageGate:
    """Runs the checks on a message and refuses it loudly when one fails."""

    def __init__(self, settings: Settings, queues: frozenset[str], checks: list[Check]) -> None:
        self.settings = settings
        self.queues = queues
        self.checks = checks
        self._redis = broker.connect(settings.broker_url, timeout=5.0)

    def admit(self, message: Message) -> bool:
        """True when the message may run; otherwise it has been refused and rejected."""
        for check in self.checks:
            refusal = check(message, self.queues)
            if refusal is not None:
                self.refuse(message, refusal)
                return False
        return True

    def refuse(self, message: Message, refusal: Refusal) -> None:
        """Reject without requeue, log one WARNING line, count it, keep the raw message."""
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
        entry = json.dumps(
            {
                "ts": time.time(),
                "reason": refusal.reason,
                "detail": refusal.detail,
                "id": task_id,
                "headers": _jsonable(headers),
                "delivery_info": _jsonable(message.delivery_info),
                "body": _raw_body(message),
            }
        )
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(c.refused_counter_key(role), refusal.reason, 1)
        pipe.lpush(c.dead_letter_key(role), entry)
        pipe.ltrim(c.dead_letter_key(role), 0, c.DEAD_LETTER_MAX - 1)
        pipe.execute()
        message.reject(requeue=False)


class GatedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer with the message gate in front of every task message."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Message], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        gate = MessageGate(Settings.from_env(), consumed_queues(self.app), default_checks())

        def on_task_received(message: Message) -> Any:
            if gate.admit(message):
                return handle(message)
            return None

        return on_task_received


def consumed_queues(app: Any) -> frozenset[str]:
    """Names of the queues this worker consumes (``-Q``), or every queue when none was named."""
    names = app.amqp.queues.consume_from or app.amqp.queues
    return frozenset(str(name) for name in names)


def default_checks() -> list[Check]:
    """The checks every message passes, in order."""
    return [check_role]


def _role_of(headers: dict[str, Any], queues: frozenset[str]) -> str:
    task = headers.get("task")
    role = task.split(".", 1)[0] if isinstance(task, str) else ""
    if role in queues:
        return role
    return sorted(queues)[0] if len(queues) == 1 else "unknown"


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return repr(value)[:1000]


def _raw_body(message: Message) -> str:
    body = message.body
    text = body.decode("utf-8", "replace") if isinstance(body, bytes | bytearray) else str(body)
    return text[:DEAD_LETTER_BODY_MAX]
