"""One run of a workflow: submits its steps as the copilot, waits for them, records each, cancels on failure.

Parallel steps go out as one signed Celery ``group``: one group id links them (each member's stored result carries
it as ``group_id``, and so does each step's record). Flower lists every member, but Celery's task events carry
no group id, so it does not draw them as one group. Sequential steps are single submits, never a
``chain``: in a chain each worker publishes the next task to the next role's queue, which the Redis ACLs forbid
by design (a role pushes to no queue but its own), so the copilot sends every step itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from celery import group
from kombu.exceptions import OperationalError
from kombu.utils.uuid import uuid
from redis import RedisError

from xnai_tasks.errors import BrokerUnreachableError, RefusedError, TaskTimeoutError, WorkflowFailedError, XnaiError
from xnai_tasks.workflow.provenance import provenance_of
from xnai_tasks.workflow.spec import DEFAULT_STEP_TIMEOUT_S, Step

if TYPE_CHECKING:
    from celery import Signature

    from xnai_tasks.client.sync import Client, TaskHandle

log = logging.getLogger(__name__)


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


def _failure(exc: XnaiError) -> str:
    if isinstance(exc, TaskTimeoutError):
        return "timed out"
    if isinstance(exc, RefusedError):
        return "refused"
    return "failed"


class Run:
    """The state of one workflow run; the driver calls :meth:`step`, :meth:`parallel` and :meth:`remark`."""

    def __init__(
        self, client: Client, workflow: str, run_id: str, on_step: Callable[[StepRecord], None] | None = None
    ) -> None:
        self.client = client
        self.workflow = workflow
        self.id = run_id
        self.steps: list[StepRecord] = []
        self.remarks: list[str] = []
        self._on_step = on_step
        self._handles: dict[str, TaskHandle] = {}
        self._groups: dict[str, str] = {}  # step name -> the id of the group it was sent in

    def remark(self, text: str) -> None:
        """Say something the result's reader must know (a degraded answer, a skipped step)."""
        self.remarks.append(text)

    def record(self, record: StepRecord) -> None:
        """Add a finished step (also one the copilot did itself, e.g. validating a given draft)."""
        self.steps.append(record)
        if self._on_step is not None:
            self._on_step(record)

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
            handle = self._submit(one)
        except XnaiError as exc:  # refused at submit (a full queue, bad arguments): nothing was sent
            self._refused(one, exc)
            return None
        return self._collect([(one, handle, time.monotonic())])[name]

    def parallel(self, *steps: Step) -> dict[str, dict[str, Any] | None]:
        """Send the steps as one signed Celery group, then wait for each; a required one failing revokes the others.

        A step refused before sending (bad arguments) is skipped if optional; a required one fails the run, and
        then nothing is sent.
        """
        members: list[tuple[Step, Signature, TaskHandle]] = []
        results: dict[str, dict[str, Any] | None] = {}
        for step in steps:
            try:
                member, handle = self.client.signature(
                    step.role, step.task, expires_s=step.timeout_s, cache="off", **dict(step.kwargs)
                )
            except XnaiError as exc:
                self._refused(step, exc)
                results[step.name] = None
                continue
            members.append((step, member, handle))
        if members:
            results |= self._collect(self._send_group(members))
        return results | {step.name: None for step, _, _ in members if step.name not in results}

    def _send_group(self, members: list[tuple[Step, Signature, TaskHandle]]) -> list[tuple[Step, TaskHandle, float]]:
        """Publish ``members`` as one group, signed as the copilot; a refused publish revokes what went out."""
        group_id = uuid()
        for step, _, handle in members:
            self._groups[step.name] = group_id
            self._handles[step.name] = handle
        try:
            try:
                with self.client.signing():
                    group([member for _, member, _ in members], app=self.client.app).apply_async(task_id=group_id)
            except (OperationalError, RedisError, OSError) as exc:
                raise BrokerUnreachableError(f"could not enqueue group {group_id}: {exc}") from None
        except XnaiError as exc:  # a full queue part-way: the members before it went out
            self._unsent(members, exc)
            return []
        started = time.monotonic()
        return [(step, handle, started) for step, _, handle in members]

    def _unsent(self, members: list[tuple[Step, Signature, TaskHandle]], exc: XnaiError) -> None:
        """The group was not wholly sent: revoke every member; the first required one fails the run."""
        self._revoke([handle.id for _, _, handle in members])
        required = next((step for step, _, _ in members if not step.optional), None)
        for step, _, handle in members:
            if required is None:
                self._skip(step, handle, 0.0, exc)
            elif step is not required:
                self.record(self._record(step, handle.id, "cancelled", 0.0))
        if required is not None:
            self._fail(required, self._handles[required.name], 0.0, exc)

    def _refused(self, step: Step, exc: XnaiError) -> None:
        if not step.optional:
            self._fail(step, None, 0.0, exc)
        self._skip(step, None, 0.0, exc)

    def _collect(self, sent: list[tuple[Step, TaskHandle, float]]) -> dict[str, dict[str, Any] | None]:
        """Wait for each step sent; a required one failing revokes those still out."""
        results: dict[str, dict[str, Any] | None] = {}
        for at, (step, handle, started) in enumerate(sent):
            try:
                results[step.name] = self._wait(step, handle, started)
            except XnaiError as exc:
                if step.optional:
                    self._skip(step, handle, started, exc)
                    results[step.name] = None
                    continue
                self._cancel(sent[at + 1 :])
                self._fail(step, handle, started, exc)
        return results

    def _submit(self, step: Step) -> TaskHandle:
        # Never from the response cache: a step's result must carry its worker's signature (provenance).
        handle = self.client.submit(step.role, step.task, expires_s=step.timeout_s, cache="off", **dict(step.kwargs))
        self._handles[step.name] = handle
        return handle

    def _record(self, step: Step, task_id: str | None, outcome: str, seconds: float, detail: str = "") -> StepRecord:
        group_id = self._groups.get(step.name)
        return StepRecord(step.name, step.role, step.task, task_id, outcome, seconds, detail, group_id)

    def _wait(self, step: Step, handle: TaskHandle, started: float) -> dict[str, Any]:
        left = max(0.1, step.timeout_s - (time.monotonic() - started))
        result: dict[str, Any] = handle.get(timeout=left)
        outcome, detail = judge(result)
        self.record(self._record(step, handle.id, outcome, time.monotonic() - started, detail))
        return result

    def _skip(self, step: Step, handle: TaskHandle | None, started: float, exc: XnaiError) -> None:
        kind = _failure(exc)
        task_id = None if handle is None else handle.id
        if task_id is not None and kind == "timed out":
            self._revoke([task_id])
        self.record(self._record(step, task_id, f"skipped ({kind})", _since(started), str(exc)))
        self.remark(f"step {step.name} ({step.role}.{step.task}) {kind} and was skipped: {exc}")

    def _fail(self, step: Step, handle: TaskHandle | None, started: float, exc: XnaiError) -> NoReturn:
        kind = _failure(exc)
        if handle is not None and kind == "timed out":
            self._revoke([handle.id])
        task_id = handle.id if handle is not None else None
        self.record(self._record(step, task_id, kind, _since(started), str(exc)))
        raise WorkflowFailedError(
            f"workflow {self.workflow} {self.id}: step {step.name} ({step.role}.{step.task}) {kind}: {exc}",
            step=step.name,
            run_id=self.id,
        ) from exc

    def _cancel(self, sent: list[tuple[Step, TaskHandle, float]]) -> None:
        """Revoke steps still out; they are recorded as cancelled."""
        self._revoke([handle.id for _, handle, _ in sent])
        for step, handle, started in sent:
            self.record(self._record(step, handle.id, "cancelled", _since(started)))

    def _revoke(self, ids: list[str]) -> None:
        if not ids:
            return
        try:
            with self.client.signing():
                self.client.app.control.revoke(ids)
        except Exception as exc:  # the workflow is failing already: say it, never mask the step's error
            log.warning("could not revoke %d step(s) of run %s: %s", len(ids), self.id, exc)

    def provenance(self, name: str) -> dict[str, Any]:
        """Where step ``name``'s result came from: run, step, role, model, task id and its worker's signature."""
        handle = self._handles[name]
        return provenance_of(
            workflow=self.workflow,
            run_id=self.id,
            step=name,
            role=handle.role,
            task=handle.task,
            task_id=handle.id,
            stored=handle.stored(),
        )


def _since(started: float) -> float:
    return time.monotonic() - started if started else 0.0
