"""One run of a workflow in an event loop (AnyIO: asyncio or trio), through an :class:`AsyncClient`.

Steps go out as the sync run sends them (:mod:`.canvas`, in a worker thread); their results are awaited on the
client's one result channel, so no thread and no polling per step. A step's timeout is a cancel scope. Whatever
ends a wait early (a required step failing, the step's own timeout, the caller's cancel scope) revokes the steps
still out and kills those already running (a signed ``revoke`` with ``terminate``): nothing of the run is left
queued or running.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from kombu.utils.uuid import uuid

from xnai_tasks.errors import TaskTimeoutError, XnaiError
from xnai_tasks.workflow import canvas
from xnai_tasks.workflow.ledger import Ledger, StepRecord, provenance
from xnai_tasks.workflow.spec import DEFAULT_STEP_TIMEOUT_S, Step

if TYPE_CHECKING:
    from xnai_tasks.client.asynchronous import AsyncClient, AsyncTaskHandle
    from xnai_tasks.client.sync import TaskHandle

#: A step sent: the step and its handle.
Sent = tuple[Step, "AsyncTaskHandle"]


@dataclass
class _Gathering:
    """The steps one wait gathers: when they were sent, those still out, their results and failures."""

    started: float
    out: dict[str, Sent]
    results: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    failures: list[tuple[Step, str, XnaiError]] = field(default_factory=list)


class AsyncRun(Ledger):
    """A run whose steps are awaited in the event loop; it is what the driver is given."""

    def __init__(
        self,
        client: AsyncClient,
        workflow: str,
        run_id: str,
        *,
        on_step: Callable[[StepRecord], None] | None = None,
        save: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(workflow, run_id, on_step)
        self.client = client
        self._save = save
        self._handles: dict[str, AsyncTaskHandle] = {}

    async def step(
        self,
        name: str,
        role: str,
        task: str,
        *,
        timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
        optional: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any] | None:
        """Run one step (a single task) and return its result; None when an optional step was skipped."""
        one = Step(name, role, task, kwargs, timeout_s, optional)
        try:
            member = await anyio.to_thread.run_sync(canvas.ready, self.client.sync, one)
            (handle,) = await self._send([member], partial(canvas.send_one, self.client.sync, member, self.lineage()))
        except XnaiError as exc:  # refused before it went out (a full queue, bad arguments)
            self.refused(one, exc)
            return None
        self.follows(handle.id)
        return (await self._collect([(one, handle)]))[name]

    async def _send(
        self, members: list[canvas.Member], publish: Callable[[], list[TaskHandle]]
    ) -> list[AsyncTaskHandle]:
        """``publish`` the members' tasks and wait on them; cancelled meanwhile, they are recorded cancelled (the
        client revokes what went out)."""
        try:
            handles = await self.client.send(publish, count=len(members))
        except anyio.get_cancelled_exc_class():
            for m in members:
                self.cancelled(m.step, m.handle.id, 0.0)
            raise
        self._handles.update((m.step.name, handle) for m, handle in zip(members, handles, strict=True))
        return handles

    async def parallel(self, *steps: Step) -> dict[str, dict[str, Any] | None]:
        """Send the steps as one signed Celery group and await them together; a required one failing cancels the
        others. A step refused before sending is skipped if optional; a required one fails the run unsent."""
        members, refused = await anyio.to_thread.run_sync(canvas.prepare, self.client.sync, steps)
        for step, exc in refused:
            self.refused(step, exc)
        results: dict[str, dict[str, Any] | None] = {step.name: None for step, _ in refused}
        if members:
            results |= await self._collect(await self._send_group(members))
        return results | {m.step.name: None for m in members if m.step.name not in results}

    async def _send_group(self, members: list[canvas.Member]) -> list[Sent]:
        group_id = uuid()
        self.grouped([m.step for m in members], group_id)
        try:
            handles = await self._send(
                members, partial(canvas.send_group, self.client.sync, members, group_id, self.lineage(group_id))
            )
        except XnaiError as exc:  # not wholly sent: send_group revoked its members
            self.unsent([(m.step, m.handle.id) for m in members], exc)
            return []
        self.follows(group_id)
        return [(m.step, handle) for m, handle in zip(members, handles, strict=True)]

    async def _collect(self, sent: list[Sent]) -> dict[str, dict[str, Any] | None]:
        """Await the steps sent together; the first required one failing cancels the others (revoked, killed).

        Each call keeps its own steps: a driver awaiting two steps at once (a task group of its own) has each
        cancel only what it sent."""
        gathering = _Gathering(time.monotonic(), {step.name: (step, handle) for step, handle in sent})
        try:
            async with anyio.create_task_group() as group:
                for step, handle in sent:
                    group.start_soon(self._await, step, handle, gathering, group.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                self._cancel_out(gathering)  # the others of a failed group, or all still out when cancelled
                await self._saved()
        if gathering.failures:
            step, task_id, error = gathering.failures[0]
            self.failed(step, task_id, gathering.started, error)
        return gathering.results

    async def _await(
        self, step: Step, handle: AsyncTaskHandle, gathering: _Gathering, scope: anyio.CancelScope
    ) -> None:
        """Await one step: its result, or skip it (optional), or fail the group (required)."""
        error = await self._result_of(step, handle, gathering.started, gathering.results)
        gathering.out.pop(step.name, None)
        if error is None:
            return
        if step.optional:
            self.skipped(step, handle.id, gathering.started, error)
            gathering.results[step.name] = None
            return
        gathering.failures.append((step, handle.id, error))
        scope.cancel()

    async def _result_of(
        self, step: Step, handle: AsyncTaskHandle, started: float, results: dict[str, dict[str, Any] | None]
    ) -> XnaiError | None:
        """Put the step's result in ``results`` (and record it); else the error it ended with."""
        try:
            with anyio.fail_after(max(0.1, step.timeout_s - (time.monotonic() - started))):
                result = await handle.get(terminate=True)  # cancelled: revoked, and killed if it runs
        except TimeoutError:
            return TaskTimeoutError(f"{step.role}.{step.task} {handle.id}: no result within {step.timeout_s} s")
        except XnaiError as exc:
            return exc
        results[step.name] = result
        self.done(step, handle.id, started, result)
        return None

    def _cancel_out(self, gathering: _Gathering) -> None:
        """Record the steps of ``gathering`` still out as cancelled (their waits, cancelled, revoked them)."""
        for step, handle in gathering.out.values():
            self.cancelled(step, handle.id, gathering.started)
        gathering.out.clear()

    async def _saved(self) -> None:
        if self._save is not None:
            await self._save()

    def provenance(self, name: str) -> dict[str, Any]:
        """Where step ``name``'s result came from: run, step, role, model, task id and its worker's signature."""
        return provenance(self, name, self._handles[name])
