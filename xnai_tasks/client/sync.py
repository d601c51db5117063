"""The Python API: ``Client.from_env().submit(role, task, **kwargs).get(timeout=...)``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from celery import Celery, Signature
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.uuid import uuid
from redis import RedisError

from xnai_tasks.client.outcome import REFUSALS, settle, verify_signer
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import (
    BrokerUnreachableError,
    NoWorkerError,
    TaskTimeoutError,
    UnknownRoleError,
    UnknownTaskError,
)
from xnai_tasks.resilience.outage import outlasting_outages
from xnai_tasks.security.keyring import Keyring, SignerSource
from xnai_tasks.security.limits import check_arguments
from xnai_tasks.security.publish import load_agent, signing_as, use_agent
from xnai_tasks.settings import Settings

if TYPE_CHECKING:
    from xnai_tasks.cache.client_side import ClientCache

__all__ = ["REFUSALS", "Client", "TaskHandle"]


#: Seconds ``submit(require_worker=True)`` waits for a worker of the role to answer its ping.
WORKER_PING_S = 1.0
#: How often kombu retries a publish the broker did not take (a canvas member is published the same way).
RETRY_POLICY: dict[str, float] = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


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
        """Wait for the result; raise TaskTimeoutError, TaskFailedError or BrokerUnreachableError.

        A broker outage shorter than the timeout is waited out (resilience/outage.py): Redis restarted, the wait
        goes on and the result still arrives; a broker still away at the deadline is BrokerUnreachableError.
        """
        try:
            value = outlasting_outages(self._wait, timeout, waiting_for=self.id)
        except CeleryTimeoutError:
            raise TaskTimeoutError(
                f"{self.role}.{self.task} {self.id}: no result within {timeout} s (it may still run)"
            ) from None
        return settle(f"{self.role}.{self.task} {self.id}", str(self._result.state), value)

    def _wait(self, timeout: float | None) -> Any:
        value = self._result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
        self._verify()
        return value

    def _verify(self) -> None:
        """The stored result must be signed by the key of the role the task was sent to."""
        meta = self._result._get_task_meta()
        verify_signer(self._keyring, meta, task_id=self.id, role=self.role, stored=self._stored)

    def stored(self) -> dict[str, Any]:
        """The final result as its worker stored it: ``status``, ``result`` and its signature (provenance)."""
        return self._stored()

    def _stored(self) -> dict[str, Any]:
        """The result as stored (Celery rebuilt an exception from it)."""
        raw = self._result.backend.get(self._result.backend.get_key_for_task(self.id))
        return dict(json.loads(raw)) if raw else {}


class CachedHandle(TaskHandle):
    """A request answered from the cache: nothing was enqueued, ``get`` returns at once.

    Its value was verified by the lookup (the producing role's signature over the cache entry:
    ``cache/client_side.py``), so there is no stored result to check again.
    """

    def __init__(self, role: str, task: str, task_id: str, value: dict[str, Any]) -> None:  # no AsyncResult
        self.role = role
        self.task = task
        self._id = task_id
        self._value = value

    @property
    def id(self) -> str:
        return self._id

    @property
    def state(self) -> str:
        return "SUCCESS"

    def get(self, timeout: float | None = None) -> Any:
        return self._value


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
        self._cache: ClientCache | None = None

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

    def submit(
        self,
        role: str,
        task: str,
        *,
        require_worker: bool = False,
        expires_s: float | None = None,
        cache: str | None = None,
        **kwargs: Any,
    ) -> TaskHandle:
        """Enqueue ``ROLE.TASK`` with ``kwargs`` on the role's own queue.

        ``kwargs`` must fit the task's Python signature (no argument missing, none unknown) and be plain JSON
        (no NaN or infinity, not nested deeper than ``limits.MAX_DEPTH``): anything else is refused here with
        :class:`UsageError`, before anything is sent. A queue at its cap refuses it with :class:`OverloadedError`
        (``retry_after_s``); with ``require_worker`` no worker of the role online refuses it with
        :class:`NoWorkerError`. The message expires after ``expires_s`` (default ``XNAI_TASK_EXPIRES``, at most
        ``XNAI_MAX_MESSAGE_AGE``): a worker that takes it later drops it unrun and the caller is refused.
        ``cache`` (off, exact, semantic; default: exact for a deterministic request) may answer it from the
        response cache: an exact hit is served here, nothing enqueued (xnai_tasks/cache).
        """

        mode = self._checked(role, task, kwargs, cache)
        keyring = self._ready()
        assert self._signer is not None  # set by _ready
        hit = self._cached(role, task, kwargs, keyring) if mode != "off" else None
        if hit is not None:
            return hit
        if require_worker:
            self._require_worker(role)
        expires = self._expires(expires_s)
        task_id = uuid()
        self._expect(task_id, role)  # before sending: the result consumer subscribes while it sends
        try:
            with signing_as(self._signer):
                result = self.app.send_task(
                    c.task_name(role, task), task_id=task_id, kwargs=kwargs, **_send_options(role, mode, expires)
                )
        except (OperationalError, RedisError, OSError) as exc:
            raise BrokerUnreachableError(f"could not enqueue {role}.{task}: {exc}") from None
        return TaskHandle(result, role, task, keyring)

    def signature(
        self, role: str, task: str, *, expires_s: float | None = None, cache: str | None = None, **kwargs: Any
    ) -> tuple[Signature, TaskHandle]:
        """``ROLE.TASK`` as a member of a canvas (a group), checked as :meth:`submit` checks, and its handle.

        It goes to the role's queue with its own task id, expiry and cache header as :meth:`submit` sends them
        (never answered from the cache here); the handle verifies its result by the role's signature. Publish it
        inside :meth:`signing`.
        """

        mode = self._checked(role, task, kwargs, cache)
        task_id = uuid()
        handle = self.handle(task_id, role, task)  # before sending: the result consumer subscribes while it sends
        member = self.app.signature(
            c.task_name(role, task),
            kwargs=kwargs,
            task_id=task_id,
            **_send_options(role, mode, self._expires(expires_s)),
        )
        return member, handle

    def _checked(self, role: str, task: str, kwargs: dict[str, Any], cache: str | None) -> str:
        """Refuse a call that would fail in the worker (UsageError, before anything is sent); its cache mode."""
        from xnai_tasks.cache.policy import cache_mode
        from xnai_tasks.worker.role_task import check_call

        self._check(role, task)
        check_call(role, task, kwargs)  # refused here (exit 2), not as a TypeError in the worker (exit 4)
        check_arguments(f"{role}.{task}", kwargs)  # refused here (exit 2), never sent half-signed
        return cache_mode(role, task, kwargs, cache, enabled=self.settings.cache)

    def _expires(self, expires_s: float | None) -> float:
        return min(expires_s or float(self.settings.task_expires), float(self.settings.max_message_age))

    def _cached(self, role: str, task: str, kwargs: dict[str, Any], keyring: Keyring) -> TaskHandle | None:
        """An exact hit of the response cache, verified (xnai_tasks/cache/client_side.py); None: enqueue it."""
        from xnai_tasks.cache.client_side import ClientCache

        if self._cache is None:
            conn = getattr(self.app.backend, "client", None)  # the Redis result backend's connection
            if conn is None:
                return None
            self._cache = ClientCache(conn, keyring)
        try:
            value = self._cache.lookup(role, task, kwargs)
        except RedisError:
            return None  # the enqueue says whether the broker is away
        return None if value is None else CachedHandle(role, task, uuid(), value)

    def _require_worker(self, role: str) -> None:
        """Refuse (:class:`NoWorkerError`) when no worker of ``role`` answers a signed ping."""
        from xnai_tasks.core.nodes import workers_online

        if not workers_online(self.app, timeout=WORKER_PING_S).get(role):
            raise NoWorkerError(
                f"refused (no worker): no {role} worker answered within {WORKER_PING_S:g} s; nothing was sent"
            )

    def run(self, workflow: str, **kwargs: Any) -> dict[str, Any]:
        """Run a workflow here, as the copilot (xnai_tasks/workflow); its record: state, steps and result.

        A required step that fails cancels the steps still out and raises WorkflowFailedError naming it.
        """
        from xnai_tasks.workflow.runner import run_workflow

        return run_workflow(self, workflow, kwargs)

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


def _send_options(role: str, mode: str, expires: float) -> dict[str, Any]:
    """How every task message of the client is sent: the role's queue, its expiry, its cache mode, retries."""
    from xnai_tasks.cache.policy import CACHE_HEADER

    return {
        "queue": c.queue_for(role),
        "routing_key": role,
        "expires": expires,
        "headers": {CACHE_HEADER: mode},
        "retry": True,
        "retry_policy": RETRY_POLICY,
    }
