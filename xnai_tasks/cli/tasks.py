"""``xnai submit``: enqueue a signed task, and with ``--wait`` print its result."""

from __future__ import annotations

import json
from typing import Any

import click

from xnai_tasks.cli.parsing import Command, Number
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings


@click.command("submit", cls=Command)
@click.argument("role")
@click.argument("task")
@click.option("--kwargs", default="{}", help="task keyword arguments as a JSON object")
@click.option("--wait", is_flag=True, help="wait and print the result as JSON")
@click.option("--timeout", type=Number(float, above=0), default=60.0, help="seconds to wait with --wait (default 60)")
@click.pass_obj
def submit_command(settings: Settings, role: str, task: str, kwargs: str, wait: bool, timeout: float) -> int:
    """Enqueue a signed task; with --wait print its result as JSON."""
    from xnai_tasks.client.sync import Client

    arguments = json_object(kwargs)
    client = Client(settings)
    try:
        handle = client.submit(role, task, **arguments)
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
