"""The ``xnai`` command (DESIGN.md 4). Errors are one line on stderr; exit codes come from errors.py."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from xnai_tasks.core import constants as c
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
    from xnai_tasks.observability.logs import setup_logging
    from xnai_tasks.ops.supervisor import Stack, StopRequested, raise_on_stop_signals

    roles = _roles(args.roles)
    raise_on_stop_signals()
    setup_logging(settings)
    try:
        with Stack(settings, roles=roles, flower=not args.no_flower) as stack:
            from xnai_tasks.core.celery_app import app

            online = stack.wait_workers(app)
            for role in roles:
                print(f"{role:9} online: {', '.join(online[role])}", flush=True)
            if not args.no_flower:
                print(f"flower    http://127.0.0.1:{settings.flower_port}/", flush=True)
            print("xnai up: ready (Ctrl-C stops everything)", flush=True)
            stack.run_forever(lambda line: print(line, flush=True))
    except StopRequested as stop:
        print(f"xnai up: {stop} received, everything stopped", flush=True)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """One role's Celery worker (prefork)."""
    from xnai_tasks.worker.argv import run_worker

    role = _role(args.role)
    run_worker(settings, role, concurrency=args.concurrency, beat=args.beat)
    return 0


def cmd_redis(args: argparse.Namespace, settings: Settings) -> int:
    """The embedded Redis in the foreground (the Procfile's ``redis`` line)."""
    from xnai_tasks.observability.logs import setup_logging
    from xnai_tasks.ops.redis_server import EmbeddedRedis
    from xnai_tasks.ops.supervisor import StopRequested, raise_on_stop_signals

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


def cmd_guard(args: argparse.Namespace, settings: Settings) -> int:
    """The memory guard in the foreground (the Procfile's ``guard`` line)."""
    from xnai_tasks.core import broker
    from xnai_tasks.observability.logs import setup_logging
    from xnai_tasks.ops.memory_guard import MemoryGuard
    from xnai_tasks.ops.supervisor import StopRequested, raise_on_stop_signals
    from xnai_tasks.security import acl
    from xnai_tasks.security.keys import shared_keyring

    if not settings.embedded:
        raise UsageError("XNAI_REDIS_URL is set: the memory guard watches the embedded Redis only")
    raise_on_stop_signals()
    setup_logging(settings)
    admin = broker.connect(acl.connection_url(settings, acl.ADMIN))
    guard = MemoryGuard(
        admin,
        shared_keyring(settings.home),
        max_message_age=settings.max_message_age,
        say=lambda line: print(line, flush=True),
    )
    with contextlib.suppress(StopRequested):
        guard.run_forever()
    return 0


def cmd_flower(args: argparse.Namespace, settings: Settings) -> int:
    """Flower on 127.0.0.1 with basic auth (replaces this process)."""
    import os

    from xnai_tasks.ops.flower import ensure_credentials, flower_argv, flower_env

    creds, new = ensure_credentials(settings)
    if new:
        print(f"Flower credentials (shown once, kept in {settings.home}): {creds.basic_auth}", flush=True)
    argv = flower_argv(settings)
    os.execve(argv[0], argv, flower_env(settings, creds))


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    """Enqueue a task; with --wait print its result as JSON."""
    from xnai_tasks.client.sync import Client

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
    from xnai_tasks.observability.status import collect_status, dead_letters, format_status

    if args.dead_letters:
        entries = dead_letters(settings, _role(args.dead_letters), args.limit)
        for entry in entries:
            print(json.dumps(entry))
        return 0
    status = collect_status(settings)
    print(json.dumps(status) if args.json else format_status(status))
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    """Manage the Ed25519 keyring: init, list, rotate AGENT, authorize AGENT PATTERN..., revoke KID."""
    from xnai_tasks.security import keys

    home = settings.home
    if args.action == "init":
        keyring = keys.init_keys(home)
        print(f"keyring at {keys.keyring_path(home)}: agents {', '.join(keyring.agents())}")
    elif args.action == "list":
        rows = keys.list_keys(home)
        if args.json:
            print(json.dumps(rows))
        else:
            print(f"{'agent':10}{'key id':18}{'age':>9}  {'status':8}permissions")
            for row in rows:
                age = f"{row['age_s'] / 86400:.1f}d" if row["age_s"] >= 86400 else f"{row['age_s'] / 3600:.1f}h"
                print(f"{row['agent']:10}{row['kid']:18}{age:>9}  {row['status']:8}{', '.join(row['permissions'])}")
    elif args.action == "rotate":
        entry = keys.rotate(home, _one(args.args, "rotate AGENT"), grace_s=args.grace)
        print(f"{entry.agent}: new key {entry.kid}; older keys stay valid for {args.grace:.0f} s")
    elif args.action == "authorize":
        if len(args.args) < 2:
            raise UsageError(
                "usage: xnai keys authorize AGENT PATTERN [PATTERN...] (patterns like cline.* or grok.synthesize)"
            )
        patterns = keys.authorize(home, args.args[0], args.args[1:], replace=args.replace)
        print(f"{args.args[0]} may dispatch: {', '.join(patterns)}")
    else:  # revoke
        entry = keys.revoke(home, _one(args.args, "revoke KID"))
        print(f"revoked {entry.kid} of {entry.agent}")
    return 0


def cmd_acl(args: argparse.Namespace, settings: Settings) -> int:
    """Print the Redis ACL rules (with this home's password hashes when asked), or unlock a locked-out role."""
    from xnai_tasks.security import acl

    if args.action == "unlock":
        from xnai_tasks.ops.memory_guard import unlock

        role = _role(args.role or "")
        was = unlock(settings, role)
        print(f"unlocked {role}" + (f" (it was locked: {was})" if was else " (it was not locked)"))
        return 0
    passwords = acl.ensure_passwords(settings.home) if args.hashes else None
    try:
        major, minor = (int(part) for part in args.redis_version.split(".")[:2])
    except ValueError:
        raise UsageError(f"--redis-version {args.redis_version!r} is not MAJOR.MINOR") from None
    print(acl.render_acl(passwords, db=acl.url_db(settings.broker_url), server_version=(major, minor)), end="")
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    """Run a named benchmark."""
    from xnai_tasks.bench import BENCHMARKS

    if args.name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args.name!r} (benchmarks: {', '.join(BENCHMARKS)})")
    report = BENCHMARKS[args.name](settings, args)
    print(json.dumps(report) if args.json else _format_report(report))
    return 0


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    """The resource plan for this host: per role processes, threads, CPU set, model mode, RAM share."""
    from xnai_tasks.plan.host import plan_for
    from xnai_tasks.plan.planner import format_plan

    plan = plan_for(settings)
    print(plan.to_json() if args.json else format_plan(plan))
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

    p = sub.add_parser("guard", help="run the memory guard of the embedded Redis in the foreground")
    p.set_defaults(func=cmd_guard)

    p = sub.add_parser("flower", help="run Flower on 127.0.0.1 with basic auth")
    p.set_defaults(func=cmd_flower)

    p = sub.add_parser("submit", help="enqueue a signed task")
    p.add_argument("role")
    p.add_argument("task")
    p.add_argument("--kwargs", default="{}", help="task keyword arguments as a JSON object")
    p.add_argument("--wait", action="store_true", help="wait and print the result as JSON")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait with --wait (default 60)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="broker, workers, queues and refused messages")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dead-letters", metavar="ROLE", help="print the refused raw messages kept for ROLE")
    p.add_argument("--limit", type=int, default=20, help="with --dead-letters: how many, newest first")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("bench", help="run a benchmark side by side with its baseline")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tasks", type=int, default=2000, help="tasks per measurement (roundtrip)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    p.add_argument("--tokens", type=int, default=None, help="max tokens per LLM task (llm, memory, threads)")
    p.add_argument("--threads", type=int, default=None, help="threads per process (llm; default 2)")
    p.add_argument("--texts", type=int, default=None, help="texts per embedding measurement (embed, threads)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("keys", help="manage the Ed25519 keys and who may dispatch what")
    p.add_argument("action", choices=["init", "list", "rotate", "authorize", "revoke"])
    p.add_argument("args", nargs="*", help="AGENT for rotate; AGENT PATTERN... for authorize; KID for revoke")
    p.add_argument("--grace", type=float, default=86400.0, help="rotate: seconds the old key stays valid")
    p.add_argument("--replace", action="store_true", help="authorize: replace the permissions instead of adding")
    p.add_argument("--json", action="store_true", help="list: JSON")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("plan", help="the resource plan for this host (per role processes, threads, CPUs, models)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("acl", help="Redis ACL users of the roles")
    p.add_argument("action", choices=["render", "unlock"])
    p.add_argument("role", nargs="?", help="unlock: the role the memory guard locked out")
    p.add_argument("--hashes", action="store_true", help="fill in the SHA-256 hashes of this home's passwords")
    p.add_argument("--redis-version", default="7.0", help="render for this Redis version (6.2 has no %%R~/%%W~)")
    p.set_defaults(func=cmd_acl)

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


def _one(values: list[str], usage: str) -> str:
    if len(values) != 1:
        raise UsageError(f"usage: xnai keys {usage}")
    return values[0]


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
