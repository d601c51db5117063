"""Run a workflow as the copilot: check its arguments, record it in Redis step by step, return its record."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kombu.utils.uuid import uuid

from xnai_tasks.workflow.catalogue import get_workflow
from xnai_tasks.workflow.run import Run, StepRecord
from xnai_tasks.workflow.store import FAILED, RUNNING, SUCCEEDED, store_of

if TYPE_CHECKING:
    from xnai_tasks.client.sync import Client


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
    flow = get_workflow(name)
    flow.check(kwargs)
    store = store_of(client)
    record: dict[str, Any] = {
        "workflow": name,
        "run_id": run_id or uuid(),
        "state": RUNNING,
        "kwargs": kwargs,
        "started_at": time.time(),
        "steps": [],
        "result": None,
        "error": None,
    }
    started = time.monotonic()

    def finished(step: StepRecord) -> None:
        record["steps"].append(step.to_dict())
        store.save(record)
        if on_step is not None:
            on_step(step)

    store.save(record, new=True)
    run = Run(client, name, record["run_id"], on_step=finished)
    try:
        result = flow.driver(run, **kwargs)
    except Exception as exc:
        record.update(state=FAILED, error=f"{type(exc).__name__}: {exc}", seconds=round(time.monotonic() - started, 2))
        store.save(record)
        raise
    record.update(state=SUCCEEDED, result=result, seconds=round(time.monotonic() - started, 2))
    store.save(record)
    return record
