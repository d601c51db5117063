"""``xnai status``: the broker, the workers online per role, queue depths and refused messages."""

from __future__ import annotations

import json

import click

from xnai_tasks.cli.parsing import Command, Number
from xnai_tasks.cli.roles import role_name
from xnai_tasks.settings import Settings


@click.command("status", cls=Command)
@click.option("--json", "as_json", is_flag=True)
@click.option("--dead-letters", metavar="ROLE", help="print the refused raw messages kept for ROLE")
@click.option("--limit", type=Number(int, low=1), default=20, help="with --dead-letters: how many, newest first")
@click.pass_obj
def status_command(settings: Settings, as_json: bool, dead_letters: str | None, limit: int) -> int:
    """Broker, workers, queues and refused messages."""
    from xnai_tasks.observability.status import collect_status, format_status
    from xnai_tasks.observability.status import dead_letters as read_dead_letters

    if dead_letters:
        for entry in read_dead_letters(settings, role_name(dead_letters), limit):
            print(json.dumps(entry))
        return 0
    status = collect_status(settings)
    print(json.dumps(status) if as_json else format_status(status))
    return 0
