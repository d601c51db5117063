"""A message that kills its worker is delivered at most ``XNAI_MAX_DELIVERIES`` times, then failed loudly.

Celery's ``task_acks_late`` + ``task_reject_on_worker_lost`` put a message back in its queue whenever
the pool process running it dies, and nothing caps that: a task that crashes its process (SIGILL in a
model kernel, SIGSEGV, the OOM killer, ``os._exit``) loops forever. Here every such death is counted in
Redis per message (task id and retry number), so the count survives worker restarts:

* :class:`LostWorkerRequest` (the worker parent, where billiard reports the death): counts the death
  and the signal; below the cap the message is requeued as Celery would; at the cap it is *finalized*.
* :meth:`DeliveryLedger.count_redelivery` (the message gate, for messages marked redelivered): counts a
  delivery whose worker vanished without a report (the whole worker killed); past the cap, finalized.

Finalized means: a FAILURE result signed by this worker whose error names ``worker_lost``, the signal and
the count (the waiting client raises :class:`~xnai_tasks.errors.TaskFailedError` at once, CLI exit 4);
the nonce marked done; the raw message dead-lettered with reason ``worker_lost`` and counted; the
message acknowledged; one ERROR line; and each death listed for ``xnai status``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import redis
from billiard.exceptions import WorkerLostError as PoolWorkerLost
from celery.worker.request import Request
from celery.worker.state import task_ready

from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import WorkerLostError
from xnai_tasks.observability.deaths import push_death
from xnai_tasks.observability.metrics import count_worker_lost
from xnai_tasks.security.ledger import finish_nonce
from xnai_tasks.security.refusal import Reason
from xnai_tasks.security.signature import SIG_HEADER
from xnai_tasks.settings import Settings, process_settings
from xnai_tasks.worker.dead_letters import dead_letter

log = logging.getLogger(__name__)

#: The refusal reason (counter, dead-letter entry) of a message given up on after its worker died.
WORKER_LOST = Reason.WORKER_LOST
#: How long the per-message counts are kept: past the maximum message age no copy can run anyway.
_SIGNAL = re.compile(r"signal (\d+) \((SIG[A-Z0-9]+)\)")
_EXITCODE = re.compile(r"exitcode (-?\d+)")


@dataclass(frozen=True)
class Deliveries:
    """What the ledger knows of one message: times delivered, deaths of its process, the last cause."""

    deliveries: int
    deaths: int
    cause: str


def death_cause(error: BaseException | str) -> str:
    """The signal name (``SIGILL``) or ``exit code N`` in billiard's "Worker exited prematurely" text."""
    text = str(error)
    found = _SIGNAL.search(text)
    if found:
        return found.group(2)
    code = _EXITCODE.search(text)
    return f"exit code {code.group(1)}" if code else "unknown cause"


class DeliveryLedger:
    """Per-message counts of deliveries and worker deaths, and the role's list of recent deaths."""

    def __init__(self, conn: redis.Redis, role: str, *, max_deliveries: int, ttl_s: int) -> None:
        self.conn = conn
        self.role = role
        self.max_deliveries = max_deliveries
        self.ttl_s = ttl_s

    def record_death(self, task_id: str, retries: int, task: str, cause: str) -> int:
        """Count a death of the process running this message; return the deaths so far."""
        key = c.lost_key(self.role, task_id, retries)
        pipe = self.conn.pipeline(transaction=True)
        pipe.hincrby(key, "deaths", 1)
        pipe.hset(key, "cause", cause)
        pipe.expire(key, self.ttl_s)
        push_death(pipe, self.role, task=task, ident=task_id, cause=cause)
        return int(pipe.execute()[0])

    def count_redelivery(self, task_id: str, retries: int) -> Deliveries:
        """Count one more delivery of a message marked redelivered; return the totals."""
        key = c.lost_key(self.role, task_id, retries)
        pipe = self.conn.pipeline(transaction=True)
        pipe.hincrby(key, "redeliveries", 1)
        pipe.expire(key, self.ttl_s)
        pipe.hgetall(key)
        fields = {_text(k): _text(v) for k, v in pipe.execute()[2].items()}
        return Deliveries(
            deliveries=1 + int(fields.get("redeliveries", 0)),
            deaths=int(fields.get("deaths", 0)),
            cause=fields.get("cause", "worker vanished"),
        )

    def exhausted_line(self, task: str, task_id: str, deliveries: int, deaths: int, cause: str) -> str:
        """The one line a finalized message fails with."""
        return (
            f"{WORKER_LOST}: the worker process running {task} {task_id} died {deaths} time(s) "
            f"(last: {cause}) in {deliveries} deliveries; not delivered again "
            f"(XNAI_MAX_DELIVERIES={self.max_deliveries}), dead-lettered"
        )

    def finalize(
        self,
        backend: Any,
        *,
        line: str,
        task_id: str,
        headers: dict[str, Any],
        delivery_info: dict[str, Any],
        body: Any,
        request: Any = None,
    ) -> None:
        """Dead-letter and count it, mark its nonce done, fail the task with a signed result, log it.

        The result comes last, so a client that sees the failure also finds the dead letter.
        """
        dead_letter(
            self.conn,
            self.role,
            reason=WORKER_LOST,
            detail=line,
            task_id=task_id,
            headers=headers,
            delivery_info=delivery_info,
            body=body,
        )
        signature = headers.get(SIG_HEADER)
        nonce = signature.get("nonce") if isinstance(signature, dict) else None
        if isinstance(nonce, str):
            finish_nonce(self.conn, c.nonce_key(self.role, nonce))
        backend.mark_as_failure(task_id, WorkerLostError(line), request=request)
        log.error(line, extra={"event": "worker_lost", "role": self.role, "task_id": task_id})


class LostWorkerRequest(Request):  # type: ignore[misc]
    """Celery's request, but a message whose pool process died is requeued only while under the cap."""

    #: The ledgers of this worker process per role, made on first use (the parent's connection, as its role).
    ledgers: ClassVar[dict[str, DeliveryLedger]] = {}

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrap ExceptionWithTraceback
        if not (isinstance(exc, PoolWorkerLost) and self.task.acks_late and self.task.reject_on_worker_lost):
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        if self._success_was_stored():
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        cause = death_cause(exc)
        count_worker_lost(str(self.task_name), self.worker_pid)
        retries = int(self._request_dict.get("retries") or 0)
        try:
            ledger = self._ledger()
            deaths = ledger.record_death(self.id, retries, self.task_name, cause)
        except redis.RedisError as exc_redis:
            log.warning("could not count the death of %s's process: %s", self.id, exc_redis)
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        log.warning(
            "the worker process running %s %s died (%s), %d of %d allowed",
            self.task_name,
            self.id,
            cause,
            deaths,
            ledger.max_deliveries,
            extra={"event": "worker_death", "role": ledger.role, "task_id": self.id, "cause": cause},
        )
        if deaths < ledger.max_deliveries:
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        task_ready(self)
        line = ledger.exhausted_line(self.task_name, self.id, deaths, deaths, cause)
        message = self._message
        ledger.finalize(
            self.task.backend,
            line=line,
            task_id=self.id,
            headers=dict(message.headers or {}),
            delivery_info=dict(message.delivery_info or {}),
            body=message.body,
            request=self._context,
        )
        self.acknowledge()
        if send_failed_event:
            self.send_event("task-failed", exception=line, traceback="")
        return None

    def _ledger(self) -> DeliveryLedger:
        role = c.role_of_task(str(self.task_name))
        if role not in self.ledgers:
            self.ledgers[role] = make_ledger(process_settings(), str(self.app.conf.broker_url), role)
        return self.ledgers[role]


def make_ledger(settings: Settings, redis_url: str, role: str) -> DeliveryLedger:
    """The ledger of ``role``, on a connection of its own."""
    return DeliveryLedger(
        broker.connect(redis_url, timeout=5.0),
        role,
        max_deliveries=settings.max_deliveries,
        ttl_s=settings.max_message_age,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
