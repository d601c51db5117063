"""``xnai submit``: enqueue a signed task, and with ``--wait`` print its result."""

from __future__ import annotations

import json
from typing import Any

import click

from xnai_tasks.cli.parsing import Choice, Command, Number
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings


@click.command("submit", cls=Command)
@click.argument("role")
@click.argument("task")
@click.option("--kwargs", default="{}", help="task keyword arguments as a JSON object")
@click.option("--wait", is_flag=True, help="wait and print the result as JSON")
@click.option("--timeout", type=Number(float, above=0), default=60.0, help="seconds to wait with --wait (default 60)")
@click.option("--require-worker", is_flag=True, help="refuse (exit 3) when no worker of ROLE is online")
@click.option(
    "--cache",
    type=Choice("off", "exact", "semantic"),
    default=None,
    help="response cache (default: exact if deterministic)",
)
@click.pass_obj
def submit_command(
    settings: Settings,
    role: str,
    task: str,
    kwargs: str,
    wait: bool,
    timeout: float,
    require_worker: bool,
    cache: str | None,
) -> int:
    """Enqueue a signed task; with --wait print its result as JSON (the message expires when the wait ends)."""
    from xnai_tasks.client.sync import Client

    arguments = json_object(kwargs)
    client = Client(settings, agent=settings.default_agent)
    try:
        expires_s = timeout if wait else None  # nobody waits for it after that: a worker drops it unrun
        handle = client.submit(role, task, require_worker=require_worker, expires_s=expires_s, cache=cache, **arguments)
        if not wait:
            print(handle.id)
            return 0
        print(json.dumps(handle.get(timeout=timeout)))
    finally:
        client.close()
    return 0


def json_object(text: str) -> dict[str, Any]:
    """``--kwargs`` read: a JSON object, else a usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError("--kwargs must be a JSON object")
    return value
