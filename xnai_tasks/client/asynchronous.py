"""The async Python API on AnyIO (asyncio or trio):

``async with AsyncClient.from_env() as client: handle = await client.submit(role, task, **kwargs)``, then
``await handle.get()``, or ``await client.run(workflow, **kwargs)``. Results arrive on one subscription per
client (:mod:`.result_channel`), checked as the sync client checks them; a wait that is cancelled (a cancel scope,
``anyio.fail_after``, a failing task group) revokes its task with a signed control command, and at most
``max_in_flight`` tasks are out at once. Sending runs the sync client's ``submit`` (or a workflow's canvas) in a
worker thread (kombu publishes blocking); waiting uses none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import anyio
from celery import states

from xnai_tasks.client.outcome import settle, verify_signer
from xnai_tasks.client.result_channel import ResultChannel
from xnai_tasks.client.sync import Client, TaskHandle
from xnai_tasks.core import constants as c
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.errors import ResultSignatureError, TaskRevokedError, UsageError, XnaiError
from xnai_tasks.security.control import CONTROL_AGENTS
from xnai_tasks.security.keyring import Keyring
from xnai_tasks.security.results import SignedRedisBackend
from xnai_tasks.settings import Settings

log = logging.getLogger(__name__)

#: Tasks one client has out (sent, no final result yet) unless told otherwise.
DEFAULT_MAX_IN_FLIGHT = 64
#: Seconds a revoke may take to publish before it is given up (it runs shielded from cancellation).
REVOKE_TIMEOUT_S = 5.0
#: Seconds to connect the result channel.
CONNECT_TIMEOUT_S = 5.0


class _SendOnlyBackend(SignedRedisBackend):
    """Sending a task subscribes nothing here: the async client listens on its own channel."""

    def on_task_call(self, producer: Any, task_id: Any) -> None:
        return None


class AsyncTaskHandle:
    """A task sent by an :class:`AsyncClient`: its id, and :meth:`get` to await its verified result."""

    def __init__(self, client: AsyncClient, task_id: str, role: str, task: str, token: object) -> None:
        self.id = task_id
        self.role = role
        self.task = task
        self._client = client
        self._token = token
        self._done = anyio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._raw: bytes | None = None

    @property
    def done(self) -> bool:
        """True once a final result (or an error) is in."""
        return self._done.is_set()

    async def get(self, *, terminate: bool = False) -> Any:
        """The result; TaskFailedError, RefusedError, ResultSignatureError as the sync client raises them.

        No timeout of its own: wrap it in ``anyio.fail_after``. Cancelled while it waits, it revokes the task
        (``terminate``: and kills it if it already runs, as a workflow's cancelled steps are).
        """
        try:
            await self._done.wait()
        except anyio.get_cancelled_exc_class():
            await self._client.revoke(self, terminate=terminate)
            raise
        if self._error is not None:
            raise self._error
        return self._value

    def stored(self) -> dict[str, Any]:
        """The final result as its worker stored it: ``status``, ``result`` and its signature (provenance)."""
        return {} if self._raw is None else dict(json.loads(self._raw))

    def _on_payload(self, raw: bytes, published: bool) -> bool:
        """A result on the task's channel (or stored before it was heard): True once it is final."""
        if self.done:
            return True
        try:
            meta = self._client._judge(raw, published=published, task_id=self.id, role=self.role)
            if meta is None:
                return False
            self._raw = raw
            self._value = settle(f"{self.role}.{self.task} {self.id}", str(meta.get("status")), meta.get("result"))
        except XnaiError as exc:
            self._error = exc
        self._finish()
        return True

    def _fail(self, error: BaseException) -> None:
        if not self.done:
            self._error = error
            self._finish()

    def _resolve(self, value: Any) -> None:
        self._value = value
        self._finish()

    def _finish(self) -> None:
        self._done.set()
        self._client._release(self)


class AsyncClient:
    """Submits tasks and awaits their results in one event loop; use it as ``async with``."""

    def __init__(
        self, settings: Settings, *, agent: str = "copilot", max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    ) -> None:
        if max_in_flight < 1:
            raise UsageError(f"max_in_flight must be at least 1, not {max_in_flight}")
        app = create_app(settings, main="xnai_async_client")
        app.backend_cls = _SendOnlyBackend  # before any backend is made: one per sending thread
        self.settings = settings
        self.sync = Client(settings, app, agent=agent)
        self._limiter = anyio.CapacityLimiter(max_in_flight)
        self._pending: dict[str, AsyncTaskHandle] = {}
        self._stack: AsyncExitStack | None = None
        self._channel: ResultChannel | None = None
        self._keyring: Keyring | None = None
        self._backend: Any = None

    @classmethod
    def from_env(cls, *, agent: str = "copilot", max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> AsyncClient:
        """A client configured from the ``XNAI_*`` environment variables."""
        return cls(Settings.from_env(), agent=agent, max_in_flight=max_in_flight)

    async def __aenter__(self) -> AsyncClient:
        self._keyring = await anyio.to_thread.run_sync(self.sync._ready)
        self._backend = self.sync.app.backend
        channel = ResultChannel(dict(self._backend.connparams), timeout_s=CONNECT_TIMEOUT_S)
        async with AsyncExitStack() as stack:
            group = await stack.enter_async_context(anyio.create_task_group())
            await group.start(channel.run)
            stack.callback(group.cancel_scope.cancel)
            self._channel, self._stack = channel, stack.pop_all()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Leaving on an error revokes every task still out: none is left running for nobody."""
        stack, self._stack, self._channel = self._stack, None, None
        try:
            if error is not None and self._pending:
                await self.revoke(*self._pending.values())
        finally:
            try:
                if stack is not None:
                    await stack.aclose()
            finally:
                with anyio.CancelScope(shield=True):  # closed even when leaving a cancelled scope
                    await anyio.to_thread.run_sync(self.sync.close)

    async def submit(
        self,
        role: str,
        task: str,
        *,
        require_worker: bool = False,
        expires_s: float | None = None,
        cache: str | None = None,
        **kwargs: Any,
    ) -> AsyncTaskHandle:
        """Send ``ROLE.TASK`` as :meth:`Client.submit` does; waits while ``max_in_flight`` tasks are out."""

        def publish() -> list[TaskHandle]:
            options: dict[str, Any] = {"require_worker": require_worker, "expires_s": expires_s, "cache": cache}
            return [self.sync.submit(role, task, **options, **kwargs)]

        (handle,) = await self.send(publish)
        return handle

    async def send(self, publish: Callable[[], Sequence[TaskHandle]], *, count: int = 1) -> list[AsyncTaskHandle]:
        """Await the results of the ``count`` tasks ``publish`` sends in a worker thread with this client's sync
        side (a submit, or a canvas built with ``client.sync.signature``, as a workflow's steps are).

        It first waits for ``count`` of the ``max_in_flight`` slots (UsageError for more than there are); cancelled
        once ``publish`` ran, it revokes what was sent.
        """
        if self._channel is None:
            raise UsageError("use the AsyncClient as `async with AsyncClient.from_env() as client:`")
        if count > self._limiter.total_tokens:
            raise UsageError(f"{count} tasks sent at once are more than max_in_flight ({self._limiter.total_tokens:g})")
        tokens: list[object] = []
        try:
            for _ in range(count):
                token = object()
                await self._limiter.acquire_on_behalf_of(token)
                tokens.append(token)
            sent = await self._publish(publish)
        except BaseException:
            self._release_tokens(tokens)
            raise
        self._release_tokens(tokens[len(sent) :])
        handles = [
            AsyncTaskHandle(self, one.id, one.role, one.task, token)
            for one, token in zip(sent, tokens[: len(sent)], strict=True)
        ]
        await self._adopt(list(zip(sent, handles, strict=True)))
        return handles

    def _release_tokens(self, tokens: list[object]) -> None:
        for token in tokens:
            self._limiter.release_on_behalf_of(token)

    async def _adopt(self, sent: list[tuple[TaskHandle, AsyncTaskHandle]]) -> None:
        """Wait on the channel for each task sent (answered from the cache: resolved now); revoke all on error."""
        from xnai_tasks.client.sync import CachedHandle

        assert self._channel is not None
        for _, handle in sent:
            self._pending[handle.id] = handle
        try:
            for one, handle in sent:
                if isinstance(one, CachedHandle):
                    handle._resolve(one.get())  # answered from the response cache: nothing was sent
                else:
                    await self._channel.watch(c.result_key(handle.role, handle.id), handle._on_payload, handle._fail)
        except BaseException:
            await self.revoke(*(handle for _, handle in sent))
            raise

    async def _publish(self, publish: Callable[[], Sequence[TaskHandle]]) -> Sequence[TaskHandle]:
        """``publish`` in a worker thread; cancelled meanwhile, the tasks it did send are revoked."""
        sent: list[TaskHandle] = []

        def send() -> None:
            sent.extend(publish())

        try:
            await anyio.to_thread.run_sync(send)
        except anyio.get_cancelled_exc_class():
            await self._revoke_ids([one.id for one in sent])
            raise
        return sent

    async def run(self, workflow: str, **kwargs: Any) -> dict[str, Any]:
        """Run a workflow in this event loop, as the copilot (xnai_tasks/workflow); its record as ``Client.run``
        returns it (``workflow``, ``run_id``, ``state``, ``steps``, ``result``), also listed by ``xnai runs``.

        A required step that fails cancels the steps still out and raises WorkflowFailedError naming it. Cancelled
        (a cancel scope, ``anyio.fail_after``), it revokes every step still queued or running and kills those
        running; the run is recorded ``cancelled``.
        """
        from xnai_tasks.workflow.runner import run_workflow_async

        return await run_workflow_async(self, workflow, kwargs)

    async def revoke(self, *handles: AsyncTaskHandle, terminate: bool = False) -> None:
        """Revoke tasks not done yet (a signed ``revoke``, as this client's agent; ``terminate``: also kill those
        already running); their ``get`` then raises TaskRevokedError. Shielded: it runs to its end even in a
        cancelled scope."""
        waiting = [h for h in handles if not h.done]
        for handle in waiting:
            handle._fail(TaskRevokedError(f"{handle.role}.{handle.task} {handle.id} was revoked by this client"))
        await self._revoke_ids([h.id for h in waiting], terminate=terminate)
        if self._channel is not None:
            with anyio.CancelScope(shield=True):
                for handle in waiting:
                    await self._channel.forget(c.result_key(handle.role, handle.id))

    async def _revoke_ids(self, ids: list[str], *, terminate: bool = False) -> None:
        if not ids:
            return
        with anyio.move_on_after(REVOKE_TIMEOUT_S, shield=True):
            await anyio.to_thread.run_sync(self._revoke_now, ids, terminate, abandon_on_cancel=True)

    def _revoke_now(self, ids: list[str], terminate: bool) -> None:
        if self.sync.agent not in CONTROL_AGENTS:  # a worker would refuse it and dead-letter it
            log.warning("cannot revoke %d task(s): only %s may", len(ids), ", ".join(sorted(CONTROL_AGENTS)))
            return
        try:
            with self.sync.signing():
                self.sync.app.control.revoke(ids, terminate=terminate)
        except Exception as exc:  # the caller is being cancelled: say it, never mask the cancellation
            log.warning("could not revoke %d task(s) %s: %s", len(ids), ", ".join(ids[:3]), exc)

    def _judge(self, raw: bytes, *, published: bool, task_id: str, role: str) -> Mapping[str, Any] | None:
        """A final result's meta once its signer checks out; None: not final, or a forgery published to ignore."""
        assert self._keyring is not None
        try:
            meta = self._backend.decode_authentic(raw) if published else self._backend.decode_result(raw)
        except (ValueError, TypeError) as exc:
            if published:
                return None
            raise ResultSignatureError(f"result of task {task_id} is not authentic: unreadable ({exc})") from None
        if meta.get("status") not in states.READY_STATES or (published and meta.get("task_id") != task_id):
            return None  # not final, or another task's result replayed on this channel
        verify_signer(self._keyring, meta, task_id=task_id, role=role, stored=lambda: dict(json.loads(raw)))
        return dict(meta)

    def _release(self, handle: AsyncTaskHandle) -> None:
        if self._pending.pop(handle.id, None) is not None:
            self._limiter.release_on_behalf_of(handle._token)
