"""One run of a workflow in the caller's thread (sync): submits its steps as the copilot, waits for them, records
each, cancels on failure. The async run (:mod:`.async_run`) does the same in an event loop.

Parallel steps go out as one signed Celery ``group``: one group id links them (each member's stored result carries
it as ``group_id``, and so does each step's record, and Flower shows it as the members' parent: see
:meth:`Ledger.lineage`). Sequential steps are single submits, never a ``chain``: in a chain each worker publishes
the next task to the next role's queue, which the Redis ACLs forbid by design (a role pushes to no queue but its
own), so the copilot sends every step itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from kombu.utils.uuid import uuid

from xnai_tasks.errors import XnaiError
from xnai_tasks.workflow import canvas
from xnai_tasks.workflow.canvas import Member
from xnai_tasks.workflow.ledger import Ledger, StepRecord, failure_kind, provenance
from xnai_tasks.workflow.spec import DEFAULT_STEP_TIMEOUT_S, Step

if TYPE_CHECKING:
    from xnai_tasks.client.sync import Client, TaskHandle

__all__ = ["Run", "drive"]

T = TypeVar("T")

#: A step sent: the step, its handle, when it went out.
Sent = tuple[Step, "TaskHandle", float]


class Run(Ledger):
    """A run whose steps block until done; the driver sees it through :meth:`driven`."""

    def __init__(
        self, client: Client, workflow: str, run_id: str, on_step: Callable[[StepRecord], None] | None = None
    ) -> None:
        super().__init__(workflow, run_id, on_step)
        self.client = client
        self._handles: dict[str, TaskHandle] = {}

    def driven(self) -> Blocking:
        """This run as a driver calls it (:class:`~.ledger.Steps`): its awaits never suspend."""
        return Blocking(self)

    def step(
        self,
        name: str,
        role: str,
        task: str,
        *,
        timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
        optional: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any] | None:
        """Run one step (a single submit) and return its result; None when an optional step was skipped."""
        one = Step(name, role, task, kwargs, timeout_s, optional)
        try:
            (handle,) = canvas.send_one(self.client, canvas.ready(self.client, one), self.lineage())
        except XnaiError as exc:  # refused at submit (a full queue, bad arguments): nothing was sent
            self.refused(one, exc)
            return None
        self._sent(one, handle)
        self.follows(handle.id)
        return self._collect([(one, handle, time.monotonic())])[name]

    def parallel(self, *steps: Step) -> dict[str, dict[str, Any] | None]:
        """Send the steps as one signed Celery group, then wait for each; a required one failing revokes the others.

        A step refused before sending (bad arguments) is skipped if optional; a required one fails the run, and
        then nothing is sent.
        """
        members, refused = canvas.prepare(self.client, steps)
        for step, exc in refused:
            self.refused(step, exc)
        results: dict[str, dict[str, Any] | None] = {step.name: None for step, _ in refused}
        if members:
            results |= self._collect(self._send_group(members))
        return results | {m.step.name: None for m in members if m.step.name not in results}

    def _send_group(self, members: list[Member]) -> list[Sent]:
        """Publish ``members`` as one group, signed as the copilot; a refused publish revokes what went out."""
        group_id = uuid()
        self.grouped([m.step for m in members], group_id)
        for member in members:
            self._sent(member.step, member.handle)
        try:
            canvas.send_group(self.client, members, group_id, self.lineage(group_id))
        except XnaiError as exc:  # a full queue part-way: the members before it went out (now revoked)
            self.unsent([(m.step, m.handle.id) for m in members], exc)
            return []
        self.follows(group_id)
        started = time.monotonic()
        return [(m.step, m.handle, started) for m in members]

    def _sent(self, step: Step, handle: TaskHandle) -> None:
        self._handles[step.name] = handle

    def _collect(self, sent: list[Sent]) -> dict[str, dict[str, Any] | None]:
        """Wait for each step sent; a required one failing revokes those still out."""
        results: dict[str, dict[str, Any] | None] = {}
        for at, (step, handle, started) in enumerate(sent):
            try:
                results[step.name] = self._wait(step, handle, started)
            except XnaiError as exc:
                if failure_kind(exc) == "timed out":
                    canvas.revoke(self.client, [handle.id])
                if step.optional:
                    self.skipped(step, handle.id, started, exc)
                    results[step.name] = None
                    continue
                self._cancel(sent[at + 1 :])
                self.failed(step, handle.id, started, exc)
        return results

    def _wait(self, step: Step, handle: TaskHandle, started: float) -> dict[str, Any]:
        left = max(0.1, step.timeout_s - (time.monotonic() - started))
        result: dict[str, Any] = handle.get(timeout=left)
        self.done(step, handle.id, started, result)
        return result

    def _cancel(self, sent: list[Sent]) -> None:
        """Revoke steps still out; they are recorded as cancelled."""
        canvas.revoke(self.client, [handle.id for _, handle, _ in sent])
        for step, handle, started in sent:
            self.cancelled(step, handle.id, started)

    def provenance(self, name: str) -> dict[str, Any]:
        """Where step ``name``'s result came from: run, step, role, model, task id and its worker's signature."""
        return provenance(self, name, self._handles[name])


class Blocking:
    """A sync :class:`Run` as its driver calls it: each ``await`` runs the step to its end, never suspending."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.id = run.id
        self.remarks = run.remarks

    def remark(self, text: str) -> None:
        self.run.remark(text)

    def record(self, record: StepRecord) -> None:
        self.run.record(record)

    def provenance(self, name: str) -> dict[str, Any]:
        return self.run.provenance(name)

    async def step(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        return self.run.step(*args, **kwargs)

    async def parallel(self, *steps: Step) -> dict[str, dict[str, Any] | None]:
        return self.run.parallel(*steps)


def drive(work: Coroutine[Any, Any, T]) -> T:
    """The value of a driver's coroutine run against a :class:`Blocking` run, in this thread, without an event
    loop: its awaits never suspend, so one ``send`` runs it to its end."""
    try:
        work.send(None)
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    work.close()
    raise RuntimeError("a workflow driver awaited something other than its run's steps")
