"""What a run knows and decides, whichever client runs its steps: the records of its steps, its remarks, the
lineage its step tasks carry in Celery (and so in Flower), and what a failed, skipped or cancelled step means.

:class:`Ledger` does no I/O: the sync :class:`~xnai_tasks.workflow.run.Run` and the async
:class:`~xnai_tasks.workflow.async_run.AsyncRun` send, wait and revoke, then tell it what happened. A workflow's
driver sees either through :class:`Steps`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from xnai_tasks.errors import RefusedError, TaskTimeoutError, WorkflowFailedError, XnaiError
from xnai_tasks.workflow.provenance import provenance_of
from xnai_tasks.workflow.spec import DEFAULT_STEP_TIMEOUT_S, Step


@dataclass
class StepRecord:
    """What one step did: who ran it, its task id, its outcome, how long it took, the group it was sent in."""

    name: str
    role: str
    task: str
    task_id: str | None
    outcome: str
    seconds: float
    detail: str = ""
    group_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "task": self.task,
            "task_id": self.task_id,
            "outcome": self.outcome,
            "seconds": round(self.seconds, 2),
            "detail": self.detail,
            "group_id": self.group_id,
        }


class Steps(Protocol):
    """What a workflow's driver calls: the same for a run in a thread (sync) and in an event loop (async)."""

    id: str
    remarks: list[str]

    def remark(self, text: str) -> None: ...

    def record(self, record: StepRecord) -> None: ...

    def provenance(self, name: str) -> dict[str, Any]: ...

    async def step(
        self,
        name: str,
        role: str,
        task: str,
        *,
        timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
        optional: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any] | None: ...

    async def parallel(self, *steps: Step) -> dict[str, dict[str, Any] | None]: ...


class Handle(Protocol):
    """A sent step's handle, sync or async, as far as its provenance needs it."""

    @property
    def id(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def task(self) -> str: ...

    def stored(self) -> dict[str, Any]: ...


def provenance(ledger: Ledger, name: str, handle: Handle) -> dict[str, Any]:
    """Where step ``name``'s result came from: run, step, role, model, task id and its worker's signature (read
    through ``handle``, the step's sync or async handle)."""
    return provenance_of(
        workflow=ledger.workflow,
        run_id=ledger.id,
        step=name,
        role=handle.role,
        task=handle.task,
        task_id=handle.id,
        stored=handle.stored(),
    )


def judge(result: Any) -> tuple[str, str]:
    """The outcome of a step's result: ok, degraded (and why) or invalid (and the validation error)."""
    if not isinstance(result, Mapping):
        return "ok", ""
    if result.get("degraded"):
        return "degraded", str(result.get("degraded_reason") or "")
    validation = result.get("validation")
    if isinstance(validation, Mapping) and validation.get("valid") is False:
        return "invalid", str(validation.get("error") or "")
    return "ok", ""


def failure_kind(exc: XnaiError) -> str:
    """How a step that did not succeed is recorded: timed out, refused or failed."""
    if isinstance(exc, TaskTimeoutError):
        return "timed out"
    if isinstance(exc, RefusedError):
        return "refused"
    return "failed"


def since(started: float) -> float:
    """Seconds since ``started`` (a monotonic time; 0 for a step that never went out)."""
    return time.monotonic() - started if started else 0.0


class Ledger:
    """The records, remarks and lineage of one run; subclasses send the steps and report their ends here."""

    def __init__(self, workflow: str, run_id: str, on_step: Callable[[StepRecord], None] | None = None) -> None:
        self.workflow = workflow
        self.id = run_id
        self.steps: list[StepRecord] = []
        self.remarks: list[str] = []
        self._on_step = on_step
        self._groups: dict[str, str] = {}  # step name -> the id of the group it was sent in
        self._parent: str | None = None  # the task (or group) the next step is decided from

    def remark(self, text: str) -> None:
        """Say something the result's reader must know (a degraded answer, a skipped step)."""
        self.remarks.append(text)

    def record(self, record: StepRecord) -> None:
        """Add a finished step (also one the copilot did itself, e.g. validating a given draft)."""
        self.steps.append(record)
        if self._on_step is not None:
            self._on_step(record)

    def lineage(self, group_id: str | None = None) -> dict[str, str | None]:
        """Celery's ``root_id`` and ``parent_id`` of the next step's task (of a member of group ``group_id``).

        Flower shows both on a task's page (and ``/api/tasks`` returns them): every task of a run has the run id
        as its root; a sequential step has the step (or group) before it as its parent, a group's members the
        group. The message signature covers both headers.
        """
        return {"root_id": self.id, "parent_id": group_id or self._parent}

    def follows(self, parent: str) -> None:
        """The next step is decided from ``parent`` (a step's task id, or a group's id)."""
        self._parent = parent

    def grouped(self, steps: list[Step], group_id: str) -> None:
        """``steps`` go out as the members of group ``group_id``."""
        self._groups.update((step.name, group_id) for step in steps)

    def done(self, step: Step, task_id: str, started: float, result: Any) -> None:
        """A step's result is in: record its outcome."""
        outcome, detail = judge(result)
        self.record(self._record(step, task_id, outcome, since(started), detail))

    def refused(self, step: Step, exc: XnaiError) -> None:
        """A step refused before it went out: skipped if optional, else the run fails."""
        if not step.optional:
            self.failed(step, None, 0.0, exc)
        self.skipped(step, None, 0.0, exc)

    def skipped(self, step: Step, task_id: str | None, started: float, exc: XnaiError) -> None:
        """An optional step did not succeed: recorded, remarked, and the run goes on."""
        kind = failure_kind(exc)
        self.record(self._record(step, task_id, f"skipped ({kind})", since(started), str(exc)))
        self.remark(f"step {step.name} ({step.role}.{step.task}) {kind} and was skipped: {exc}")

    def cancelled(self, step: Step, task_id: str | None, started: float) -> None:
        """A step still out when the run failed or was cancelled (its task is revoked by the caller)."""
        self.record(self._record(step, task_id, "cancelled", since(started)))

    def failed(self, step: Step, task_id: str | None, started: float, exc: XnaiError) -> NoReturn:
        """A required step did not succeed: record it and raise WorkflowFailedError naming it."""
        kind = failure_kind(exc)
        self.record(self._record(step, task_id, kind, since(started), str(exc)))
        raise WorkflowFailedError(
            f"workflow {self.workflow} {self.id}: step {step.name} ({step.role}.{step.task}) {kind}: {exc}",
            step=step.name,
            run_id=self.id,
        ) from exc

    def unsent(self, steps: list[tuple[Step, str]], exc: XnaiError) -> None:
        """A group was not wholly sent (its members are revoked by the caller): the first required member fails
        the run and the others are cancelled; with none required, every member is skipped."""
        required = next(((step, task_id) for step, task_id in steps if not step.optional), None)
        for step, task_id in steps:
            if required is None:
                self.skipped(step, task_id, 0.0, exc)
            elif step is not required[0]:
                self.cancelled(step, task_id, 0.0)
        if required is not None:
            self.failed(required[0], required[1], 0.0, exc)

    def _record(self, step: Step, task_id: str | None, outcome: str, seconds: float, detail: str = "") -> StepRecord:
        group_id = self._groups.get(step.name)
        return StepRecord(step.name, step.role, step.task, task_id, outcome, seconds, detail, group_id)


__all__ = ["Handle", "Ledger", "StepRecord", "Steps", "failure_kind", "judge", "provenance", "since"]
