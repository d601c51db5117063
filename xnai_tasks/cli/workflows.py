"""``xnai run`` and ``xnai runs``: start a workflow on the copilot worker and watch it; list recent runs."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

from xnai_tasks.cli.parsing import Command, Number
from xnai_tasks.cli.tasks import json_object
from xnai_tasks.settings import Settings

if TYPE_CHECKING:
    from xnai_tasks.client.sync import Client, TaskHandle

#: Seconds between two reads of a watched run's record.
POLL_S = 0.5


@click.command("run", cls=Command)
@click.argument("workflow")
@click.option("--kwargs", default="{}", help="the workflow's keyword arguments as a JSON object")
@click.option("--wait", is_flag=True, help="watch it: each step as it finishes, then the result")
@click.option("--json", "as_json", is_flag=True, help="one JSON object: workflow, run_id, state, steps, result")
@click.option("--timeout", type=Number(float, above=0), default=1800.0, help="seconds to wait with --wait")
@click.pass_obj
def run_command(settings: Settings, workflow: str, kwargs: str, wait: bool, as_json: bool, timeout: float) -> int:
    """Run WORKFLOW (research, code, review) on the copilot worker; with --wait watch it to its end."""
    from kombu.utils.uuid import uuid

    from xnai_tasks.client.sync import Client
    from xnai_tasks.workflow.catalogue import get_workflow

    arguments = json_object(kwargs)
    get_workflow(workflow).check(arguments)  # a usage error here, before anything is sent
    client = Client(settings)
    try:
        run_id = uuid()
        handle = client.submit("copilot", "run_workflow", workflow=workflow, kwargs=arguments, run_id=run_id)
        if not wait:
            queued = {"workflow": workflow, "run_id": run_id, "state": "queued", "steps": [], "result": None}
            print(json.dumps(queued) if as_json else run_id)
            return 0
        record = _watch(client, handle, run_id, timeout, quiet=as_json)
    finally:
        client.close()
    print(json.dumps(_public(record)) if as_json else json.dumps(record["result"], indent=2))
    return 0


def _watch(client: Client, handle: TaskHandle, run_id: str, timeout: float, *, quiet: bool) -> dict[str, Any]:
    """Print each step of the run as it finishes, until it ends; its final record (raises as the run did)."""
    from xnai_tasks.workflow.store import store_of

    store, shown, deadline = store_of(client), 0, time.monotonic() + timeout
    while handle.state not in ("SUCCESS", "FAILURE", "REVOKED") and time.monotonic() < deadline:
        shown = _show(store.load(run_id), shown, quiet)
        time.sleep(POLL_S)
    try:
        record: dict[str, Any] = handle.get(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        _show(store.load(run_id), shown, quiet)
    return record


def _show(record: dict[str, Any] | None, shown: int, quiet: bool) -> int:
    steps = [] if record is None else record["steps"]
    for step in steps[shown:]:
        if not quiet:
            detail = f": {step['detail']}" if step["detail"] and step["outcome"] != "ok" else ""
            click.echo(f"{step['name']:22} {step['role']:9} {step['seconds']:7.1f} s  {step['outcome']}{detail}")
    return len(steps)


def _public(record: dict[str, Any]) -> dict[str, Any]:
    keep = ("workflow", "run_id", "state", "steps", "result", "error", "seconds")
    return {key: record.get(key) for key in keep}


@click.command("runs", cls=Command)
@click.option("--json", "as_json", is_flag=True, help="the runs as a JSON list")
@click.option("--limit", type=Number(int, low=1), default=20, help="most runs listed (default 20)")
@click.pass_obj
def runs_command(settings: Settings, as_json: bool, limit: int) -> int:
    """The recent workflow runs, newest first, with their state."""
    from xnai_tasks.client.sync import Client
    from xnai_tasks.core import broker
    from xnai_tasks.workflow.store import store_of

    broker.require_reachable(settings)
    client = Client(settings)
    try:
        runs = [_public(record) | {"started_at": record.get("started_at")} for record in store_of(client).recent(limit)]
    finally:
        client.close()
    if as_json:
        print(json.dumps([{k: v for k, v in run.items() if k != "result"} for run in runs]))
        return 0
    for run in runs:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["started_at"] or 0))
        failed = next((s["name"] for s in run["steps"] if s["outcome"] in ("failed", "refused", "timed out")), "")
        print(f"{at}  {run['run_id']}  {run['workflow']:9} {run['state']:10} {len(run['steps'])} steps  {failed}")
    return 0
