"""Run a workflow as the copilot: check its arguments, record it in Redis step by step, return its record.

:func:`run_workflow` runs it in the caller's thread (``Client.run``, the copilot worker's ``run_workflow``);
:func:`run_workflow_async` in an event loop (``AsyncClient.run``). Both run the same driver (workflow/builtin.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from kombu.utils.uuid import uuid

from xnai_tasks.workflow.async_run import AsyncRun
from xnai_tasks.workflow.catalogue import get_workflow
from xnai_tasks.workflow.ledger import StepRecord
from xnai_tasks.workflow.run import Run, drive
from xnai_tasks.workflow.spec import Workflow
from xnai_tasks.workflow.store import CANCELLED, FAILED, RUNNING, SUCCEEDED, RunStore, store_of

if TYPE_CHECKING:
    from xnai_tasks.client.asynchronous import AsyncClient
    from xnai_tasks.client.sync import Client


class RunRecord:
    """One run's record as the store keeps it: ``workflow``, ``run_id``, ``state``, ``steps``, ``result``..."""

    def __init__(self, store: RunStore, workflow: str, kwargs: dict[str, Any], run_id: str | None) -> None:
        self.store = store
        self.data: dict[str, Any] = {
            "workflow": workflow,
            "run_id": run_id or uuid(),
            "state": RUNNING,
            "kwargs": kwargs,
            "started_at": time.time(),
            "steps": [],
            "result": None,
            "error": None,
        }
        self._started = time.monotonic()

    @property
    def run_id(self) -> str:
        return str(self.data["run_id"])

    def add(self, step: StepRecord) -> None:
        """A step ended (saved with the next :meth:`save`)."""
        self.data["steps"].append(step.to_dict())

    def save(self, *, new: bool = False) -> None:
        self.store.save(self.data, new=new)

    def end(self, state: str, *, result: Any = None, error: BaseException | str | None = None) -> dict[str, Any]:
        """The run ended in ``state``: saved, and its record returned."""
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        self.data.update(state=state, result=result, error=error, seconds=round(time.monotonic() - self._started, 2))
        self.save()
        return self.data


def _checked(name: str, kwargs: dict[str, Any]) -> Workflow:
    flow = get_workflow(name)
    flow.check(kwargs)
    return flow


def run_workflow(
    client: Client,
    name: str,
    kwargs: dict[str, Any],
    *,
    run_id: str | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> dict[str, Any]:
    """Run workflow ``name`` with ``kwargs``; its record: ``workflow``, ``run_id``, ``state``, ``steps``, ``result``.

    A failed required step raises WorkflowFailedError naming it (the record says ``failed`` too).
    """
    flow = _checked(name, kwargs)
    record = RunRecord(store_of(client), name, kwargs, run_id)

    def finished(step: StepRecord) -> None:
        record.add(step)
        record.save()
        if on_step is not None:
            on_step(step)

    record.save(new=True)
    run = Run(client, name, record.run_id, on_step=finished)
    try:
        result = drive(flow.driver(run.driven(), **kwargs))
    except Exception as exc:
        record.end(FAILED, error=exc)
        raise
    return record.end(SUCCEEDED, result=result)


async def run_workflow_async(client: AsyncClient, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_workflow` in an event loop; cancelled, it revokes its steps still out and records ``cancelled``.

    The record is saved (a blocking Redis write) in a worker thread after each step.
    """
    flow = _checked(name, kwargs)
    record = RunRecord(store_of(client.sync), name, kwargs, None)
    await anyio.to_thread.run_sync(partial(record.save, new=True))
    run = AsyncRun(client, name, record.run_id, on_step=record.add, save=partial(anyio.to_thread.run_sync, record.save))
    try:
        result = await flow.driver(run, **kwargs)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(partial(record.end, CANCELLED, error="cancelled by its caller"))
        raise
    except Exception as exc:
        await anyio.to_thread.run_sync(partial(record.end, FAILED, error=exc))
        raise
    return await anyio.to_thread.run_sync(partial(record.end, SUCCEEDED, result=result))
