"""The ``xnai`` command (README, CLI), one module per command group. Errors are one line on stderr; exit codes
come from errors.py.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from xnai_tasks.cli import acl, bench, cache, host, keys, metrics, plan, report, stack, status, tasks, tls, workflows
from xnai_tasks.cli.parsing import PROG, Group, parse_command_line
from xnai_tasks.cli.words import CommandLineError
from xnai_tasks.errors import UsageError, XnaiError
from xnai_tasks.settings import process_settings

cli = Group(
    PROG,
    help="xnai-tasks: signed per-role task queue for local AI agents",
    commands=[
        stack.up_command,
        stack.worker_command,
        stack.redis_command,
        stack.guard_command,
        stack.flower_command,
        metrics.metrics_command,
        tasks.submit_command,
        workflows.run_command,
        workflows.runs_command,
        status.status_command,
        bench.bench_command,
        report.report_command,
        cache.cache_command,
        keys.keys_command,
        plan.plan_command,
        acl.acl_command,
        tls.tls_command,
        host.host_command,
        stack.demo_command,
    ],
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xnai`` console script."""
    try:
        ctx = parse_command_line(cli, sys.argv[1:] if argv is None else argv)
    except click.exceptions.Exit as done:  # after --help
        return done.exit_code
    except CommandLineError as exc:
        print(f"{exc.prog}: {exc.message}", file=sys.stderr)
        return UsageError.exit_code
    try:
        # Read once the command line is known good: a usage error is reported before a bad setting.
        ctx.obj = process_settings(acting_as=_acting_role(ctx))
        with ctx:
            code: int = ctx.command.invoke(ctx)
        return code
    except XnaiError as exc:
        print(f"xnai: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("xnai: interrupted", file=sys.stderr)
        return 130


def _acting_role(ctx: click.Context) -> str | None:
    """The role ``worker ROLE`` and ``submit ROLE`` act as: on a host joined to a hub, whose credential they use."""
    role = ctx.params.get("role") if ctx.command.name in ("worker", "submit") else None
    return role if isinstance(role, str) else None


__all__ = ["cli", "main"]
