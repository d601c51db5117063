"""``xnai plan``: the resource plan for this host."""

from __future__ import annotations

import click

from xnai_tasks.cli.parsing import Command
from xnai_tasks.settings import Settings


@click.command("plan", cls=Command)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def plan_command(settings: Settings, as_json: bool) -> int:
    """The resource plan for this host.

    Per role: processes, threads, CPU set, model mode and RAM share.
    """
    from xnai_tasks.plan.host import plan_for
    from xnai_tasks.plan.planner import format_plan

    plan = plan_for(settings)
    print(plan.to_json() if as_json else format_plan(plan))
    return 0
