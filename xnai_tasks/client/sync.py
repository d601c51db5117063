"""The Python API: ``Client.from_env().submit(role, task, **kwargs).get(timeout=...)``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.uuid import uuid
from redis import RedisError

from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import (
    BrokerUnreachableError,
    MessageRejected,
    ModelUnavailableError,
    OverBudgetError,
    RefusedError,
    TaskFailedError,
    TaskRevokedError,
    TaskTimeoutError,
    UnknownRoleError,
    UnknownTaskError,
)
from xnai_tasks.security.keyring import Keyring, SignerSource
from xnai_tasks.security.limits import check_arguments
from xnai_tasks.security.publish import load_agent, signing_as, use_agent
from xnai_tasks.security.result_signature import verify_result
from xnai_tasks.security.results import VERIFIED, VerifiedBy
from xnai_tasks.security.signature import SIG_HEADER
from xnai_tasks.settings import Settings

#: Errors a task raises to refuse work (the model cannot run here, over the RAM budget), and the one a worker
#: stores for a message its gate refused: the caller is refused (CLI exit 3), not told that the task failed.
REFUSALS = frozenset(cls.__name__ for cls in (RefusedError, ModelUnavailableError, OverBudgetError, MessageRejected))


class TaskHandle:
    """A submitted task: its id, and :meth:`get` to wait for the result."""

    def __init__(self, result: AsyncResult, role: str, task: str, keyring: Keyring) -> None:
        self._result = result
        self.role = role
        self.task = task
        self._keyring = keyring

    @property
    def id(self) -> str:
        return str(self._result.id)

    @property
    def state(self) -> str:
        return str(self._result.state)

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the result; raise TaskTimeoutError, TaskFailedError or BrokerUnreachableError."""
        try:
            value = self._result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeoutError:
            raise TaskTimeoutError(
                f"{self.role}.{self.task} {self.id}: no result within {timeout} s (it may still run)"
            ) from None
        except (RedisError, OperationalError, OSError) as exc:
            raise BrokerUnreachableError(f"lost the broker while waiting for {self.id}: {exc}") from None
        self._verify()
        if self._result.state == states.REVOKED:
            raise TaskRevokedError(f"{self.role}.{self.task} {self.id} was revoked: {_describe(value)}")
        if self._result.failed():
            if type(value).__name__ in REFUSALS:
                raise RefusedError(f"{self.role}.{self.task} {self.id} refused: {value}")
            raise TaskFailedError(f"{self.role}.{self.task} {self.id} failed: {_describe(value)}")
        return value

    def _verify(self) -> None:
        """The stored result must be signed by the key of the role the task was sent to."""
        meta = self._result._get_task_meta()
        checked = meta.get(VERIFIED)
        if isinstance(checked, VerifiedBy) and checked.agent == self.role:
            return  # its signature was checked when it arrived on the result channel: once is enough
        result = meta.get("result")
        if isinstance(result, BaseException):  # Celery rebuilt the exception; check what was stored
            raw = self._result.backend.get(self._result.backend.get_key_for_task(self.id))
            meta = json.loads(raw) if raw else {}
            result = meta.get("result")
        verify_result(
            self._keyring,
            task_id=self.id,
            status=str(meta.get("status")),
            result=result,
            signature=meta.get(SIG_HEADER),
            agent=self.role,
        )


class Client:
    """Submits tasks to role queues and waits for their results."""

    def __init__(self, settings: Settings, app: Celery | None = None, *, agent: str = "copilot") -> None:
        from xnai_tasks.core.celery_app import create_app  # avoids an import cycle

        self.settings = settings
        self.agent = agent
        self._keyring: Keyring | None = None
        self._signer: SignerSource | None = None
        self.app = app if app is not None else create_app(settings, main="xnai_client")
        self._catalogue: dict[str, list[str]] | None = None

    @classmethod
    def from_env(cls) -> Client:
        """A client configured from the ``XNAI_*`` environment variables."""
        return cls(Settings.from_env())

    def tasks(self) -> dict[str, list[str]]:
        """Every role's task names."""
        if self._catalogue is None:
            from xnai_tasks.worker.role_task import role_tasks

            self._catalogue = role_tasks(self.settings.task_modules)
        return self._catalogue

    def submit(self, role: str, task: str, **kwargs: Any) -> TaskHandle:
        """Enqueue ``ROLE.TASK`` with ``kwargs`` on the role's own queue.

        ``kwargs`` must fit the task's Python signature (no argument missing, none unknown) and be plain JSON
        (no NaN or infinity, not nested deeper than ``limits.MAX_DEPTH``): anything else is refused here with
        :class:`UsageError`, before anything is sent.
        """
        from xnai_tasks.worker.role_task import check_call

        self._check(role, task)
        check_call(role, task, kwargs)  # refused here (exit 2), not as a TypeError in the worker (exit 4)
        check_arguments(f"{role}.{task}", kwargs)  # refused here (exit 2), never sent half-signed
        keyring = self._ready()
        assert self._signer is not None  # set by _ready
        task_id = uuid()
        self._expect(task_id, role)  # before sending: the result consumer subscribes while it sends
        try:
            with signing_as(self._signer):
                result = self.app.send_task(
                    c.task_name(role, task),
                    task_id=task_id,
                    kwargs=kwargs,
                    queue=c.queue_for(role),
                    routing_key=role,
                    retry=True,
                    retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
                )
        except (OperationalError, RedisError, OSError) as exc:
            raise BrokerUnreachableError(f"could not enqueue {role}.{task}: {exc}") from None
        return TaskHandle(result, role, task, keyring)

    def handle(self, task_id: str, role: str, task: str) -> TaskHandle:
        """A handle on a task submitted elsewhere (by id), to wait for its verified result."""
        self._check(role, task)
        keyring = self._ready()
        self._expect(task_id, role)
        return TaskHandle(self.app.AsyncResult(task_id), role, task, keyring)

    @contextmanager
    def signing(self) -> Iterator[None]:
        """Sign what is published in the block with this client's key: for Celery canvases built on ``app``.

        ``with client.signing(): chain(client.app.signature("cline.echo", kwargs={"value": 1}), ...).delay()``
        """
        self._ready()
        assert self._signer is not None
        with signing_as(self._signer):
            yield

    def _ready(self) -> Keyring:
        """Once: the broker answers (fail within seconds, not after kombu's retries), and our key is loaded."""
        if self._keyring is None:
            broker.require_reachable(self.settings)
            self._signer = load_agent(self.settings.home, self.agent)
            use_agent(self.settings.home, self.agent, default_only=True)  # canvas built on this app
            self._keyring = Keyring.load(self.settings.home)
        return self._keyring

    def _expect(self, task_id: str, role: str) -> None:
        expect = getattr(self.app.backend, "expect", None)
        if expect is not None:  # our signed backend: read the result where the role stores it
            expect(task_id, role)

    def close(self) -> None:
        """Release broker and backend connections (handles collected later no longer talk to Redis)."""
        consumer = getattr(self.app.backend, "result_consumer", None)
        if consumer is not None:
            consumer.stop()
        self.app.close()

    def _check(self, role: str, task: str) -> None:
        if role not in c.ROLES:
            raise UnknownRoleError(f"unknown role {role!r} (roles: {', '.join(c.ROLES)})")
        known = self.tasks()[role]
        if task not in known:
            raise UnknownTaskError(f"role {role!r} has no task {task!r} (tasks: {', '.join(known)})")


def _describe(error: Any) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)
