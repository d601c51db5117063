"""The ``xnai`` command (DESIGN.md 4). Errors are one line on stderr; exit codes come from errors.py."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from xnai_tasks import constants as c
from xnai_tasks.errors import UsageError, XnaiError
from xnai_tasks.settings import Settings

Command = Callable[[argparse.Namespace, Settings], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message}\n")
        sys.exit(2)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Run the whole system in the foreground until SIGINT or SIGTERM."""
    from xnai_tasks.logs import setup_logging
    from xnai_tasks.supervisor import Stack, StopRequested, raise_on_stop_signals

    roles = _roles(args.roles)
    raise_on_stop_signals()
    setup_logging(settings)
    try:
        with Stack(settings, roles=roles, flower=not args.no_flower) as stack:
            from xnai_tasks.celery_app import app

            online = stack.wait_workers(app)
            for role in roles:
                print(f"{role:9} online: {', '.join(online[role])}", flush=True)
            if not args.no_flower:
                print(f"flower    http://127.0.0.1:{settings.flower_port}/", flush=True)
            print("xnai up: ready (Ctrl-C stops everything)", flush=True)
            stack.run_forever()
    except StopRequested as stop:
        print(f"xnai up: {stop} received, everything stopped", flush=True)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """One role's Celery worker (prefork)."""
    from xnai_tasks.worker import run_worker

    role = _role(args.role)
    run_worker(settings, role, concurrency=args.concurrency, beat=args.beat)
    return 0


def cmd_redis(args: argparse.Namespace, settings: Settings) -> int:
    """The embedded Redis in the foreground (the Procfile's ``redis`` line)."""
    from xnai_tasks.logs import setup_logging
    from xnai_tasks.redis_server import EmbeddedRedis
    from xnai_tasks.supervisor import StopRequested, raise_on_stop_signals

    if not settings.embedded:
        raise UsageError("XNAI_REDIS_URL is set: an external Redis is used, there is nothing to start")
    raise_on_stop_signals()
    setup_logging(settings)
    try:
        with EmbeddedRedis(settings) as server:
            print(f"redis: serving on {server.socket_path}", flush=True)
            if server.process is None:
                import signal

                signal.pause()  # reused: keep the Procfile line alive until stopped
            else:
                server.process.wait()
    except StopRequested:
        pass
    return 0


def cmd_flower(args: argparse.Namespace, settings: Settings) -> int:
    """Flower on 127.0.0.1 with basic auth (replaces this process)."""
    import os

    from xnai_tasks.flower import ensure_credentials, flower_argv, flower_env

    creds, new = ensure_credentials(settings)
    if new:
        print(f"Flower credentials (shown once, kept in {settings.home}): {creds.basic_auth}", flush=True)
    argv = flower_argv(settings)
    os.execve(argv[0], argv, flower_env(settings, creds))


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    """Enqueue a task; with --wait print its result as JSON."""
    from xnai_tasks.client import Client

    kwargs = _json_object(args.kwargs)
    client = Client(settings)
    try:
        handle = client.submit(args.role, args.task, **kwargs)
        if not args.wait:
            print(handle.id)
            return 0
        print(json.dumps(handle.get(timeout=args.timeout)))
    finally:
        client.close()
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Redis reachability, workers online per role, queue depths."""
    from xnai_tasks.status import collect_status, format_status

    status = collect_status(settings)
    print(json.dumps(status) if args.json else format_status(status))
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    """Run a named benchmark."""
    from xnai_tasks.bench import BENCHMARKS

    if args.name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args.name!r} (benchmarks: {', '.join(BENCHMARKS)})")
    report = BENCHMARKS[args.name](settings, args)
    print(json.dumps(report) if args.json else _format_report(report))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Start the stack, run a real task on every role, print the answers, stop."""
    from xnai_tasks.demo import run_demo

    return run_demo(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xnai", description="xnai-tasks: signed per-role task queue for local AI agents")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("up", help="run Redis, every role worker, beat and Flower in the foreground")
    p.add_argument("--roles", default=",".join(c.ROLES), help="comma-separated roles (default: all)")
    p.add_argument("--no-flower", action="store_true", help="do not start Flower")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("worker", help="run one role's worker")
    p.add_argument("role")
    p.add_argument("--concurrency", "-c", type=int, default=None, help="pool processes (default: the plan)")
    p.add_argument("--beat", action="store_true", help="also run Celery beat (the copilot does)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("redis", help="run the embedded Redis in the foreground")
    p.set_defaults(func=cmd_redis)

    p = sub.add_parser("flower", help="run Flower on 127.0.0.1 with basic auth")
    p.set_defaults(func=cmd_flower)

    p = sub.add_parser("submit", help="enqueue a signed task")
    p.add_argument("role")
    p.add_argument("task")
    p.add_argument("--kwargs", default="{}", help="task keyword arguments as a JSON object")
    p.add_argument("--wait", action="store_true", help="wait and print the result as JSON")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait with --wait (default 60)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="broker, workers and queues")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("bench", help="run a benchmark side by side with its baseline")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tasks", type=int, default=2000, help="tasks per measurement (roundtrip)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="start the stack, run a real task on every role, print, stop")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xnai`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        code: int = args.func(args, settings)
        return code
    except XnaiError as exc:
        print(f"xnai: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("xnai: interrupted", file=sys.stderr)
        return 130


def _role(name: str) -> str:
    if name not in c.ROLES:
        raise UsageError(f"unknown role {name!r} (roles: {', '.join(c.ROLES)})")
    return name


def _roles(spec: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()))
    if not names:
        raise UsageError("--roles names no role")
    return tuple(_role(name) for name in names)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError("--kwargs must be a JSON object")
    return value


def _format_report(report: dict[str, Any]) -> str:
    lines = [f"{report.get('benchmark', 'benchmark')}:"]
    for key, value in report.items():
        if key != "benchmark":
            lines.append(f"  {key}: {json.dumps(value)}")
    return "\n".join(lines)
