"""``xnai up|worker|redis|guard|flower|demo``: the whole system, or one of its processes, in the foreground."""

from __future__ import annotations

import contextlib

import click

from xnai_tasks.cli.parsing import Command, Number
from xnai_tasks.cli.roles import role_name, role_names
from xnai_tasks.core import constants as c
from xnai_tasks.errors import UsageError
from xnai_tasks.settings import Settings


def keys_on_first_run(settings: Settings) -> None:
    """On a fresh home served by the embedded Redis, make the keys as ``xnai up`` does before it starts anything.

    Each line of the Procfile (honcho starts them all at once) does this for itself, so none depends on another
    going first: :func:`~xnai_tasks.security.key_admin.init_keys` holds the keyring's lock and gives only an agent
    without a key a new one, so processes racing here agree on one keyring. A home that has a keyring is left as
    it is (a revoked agent stays revoked); with an external Redis the operator makes and shares the keys.
    """
    from xnai_tasks.security.key_admin import init_keys
    from xnai_tasks.security.key_store import keyring_path

    if settings.embedded and not keyring_path(settings.home).exists():
        init_keys(settings.home)


@click.command("up", cls=Command)
@click.option("--roles", default=",".join(c.ROLES), help="comma-separated roles (default: all)")
@click.option("--no-flower", is_flag=True, help="do not start Flower")
@click.pass_obj
def up_command(settings: Settings, roles: str, no_flower: bool) -> int:
    """Run Redis, every role worker, beat and Flower in the foreground."""
    from xnai_tasks.observability.logs import setup_logging
    from xnai_tasks.ops.supervisor import Stack, StopRequested, raise_on_stop_signals

    names = role_names(roles)
    raise_on_stop_signals()
    setup_logging(settings)
    try:
        with Stack(settings, roles=names, flower=not no_flower, metrics=True) as stack:
            from xnai_tasks.core.celery_app import app

            online = stack.wait_workers(app)
            for role in names:
                print(f"{role:9} online: {', '.join(online[role])}", flush=True)
            if not no_flower:
                print(f"flower    http://127.0.0.1:{settings.flower_port}/", flush=True)
            print(f"metrics   http://{c.METRICS_HOST}:{settings.metrics_port}/metrics", flush=True)
            if settings.embedded and settings.redis_tls_port is not None:
                print(f"redis tls {settings.redis_tls_bind}:{settings.redis_tls_port} (mutual TLS)", flush=True)
            print("xnai up: ready (Ctrl-C stops everything)", flush=True)
            stack.run_forever(lambda line: print(line, flush=True))
    except StopRequested as stop:
        print(f"xnai up: {stop} received, everything stopped", flush=True)
    return 0


@click.command("worker", cls=Command)
@click.argument("role")
@click.option("--concurrency", "-c", type=Number(int, low=1), default=None, help="pool processes (default: the plan)")
@click.option("--beat", is_flag=True, help="also run Celery beat (the copilot does)")
@click.pass_obj
def worker_command(settings: Settings, role: str, concurrency: int | None, beat: bool) -> int:
    """Run one role's worker."""
    from xnai_tasks.worker.argv import run_worker

    name = role_name(role)
    keys_on_first_run(settings)
    run_worker(settings, name, concurrency=concurrency, beat=beat)
    return 0


@click.command("redis", cls=Command)
@click.pass_obj
def redis_command(settings: Settings) -> int:
    """Run the embedded Redis in the foreground."""
    from xnai_tasks.observability.logs import setup_logging
    from xnai_tasks.ops.redis_server import EmbeddedRedis
    from xnai_tasks.ops.supervisor import StopRequested, raise_on_stop_signals
    from xnai_tasks.ops.tls_proxy import ProxyThread, TlsProxy

    if not settings.embedded:
        raise UsageError("XNAI_REDIS_URL is set: an external Redis is used, there is nothing to start")
    # XNAI_REDIS_TLS_PORT: the TLS terminator beside it, in a thread (xnai up runs it as a process of its own)
    proxy = None if settings.redis_tls_port is None else ProxyThread(TlsProxy.for_settings(settings))
    raise_on_stop_signals()
    setup_logging(settings)
    try:
        with EmbeddedRedis(settings) as server:
            print(f"redis: serving on {server.socket_path}", flush=True)
            if proxy is not None:
                proxy.start()
                print(f"redis: TLS on {settings.redis_tls_bind}:{settings.redis_tls_port}", flush=True)
            if server.process is None:
                import signal

                signal.pause()  # reused: keep the Procfile line alive until stopped
            else:
                server.process.wait()
    except StopRequested:
        pass
    finally:
        if proxy is not None:
            proxy.stop()
    return 0


@click.command("guard", cls=Command)
@click.pass_obj
def guard_command(settings: Settings) -> int:
    """Run the memory guard of the embedded Redis in the foreground."""
    from xnai_tasks.core import broker
    from xnai_tasks.observability.logs import setup_logging
    from xnai_tasks.ops.memory_guard import MemoryGuard
    from xnai_tasks.ops.supervisor import StopRequested, raise_on_stop_signals
    from xnai_tasks.security import acl, redis_urls
    from xnai_tasks.security.keyring import shared_keyring

    if not settings.embedded:
        raise UsageError("XNAI_REDIS_URL is set: the memory guard watches the embedded Redis only")
    keys_on_first_run(settings)
    raise_on_stop_signals()
    setup_logging(settings)
    admin = broker.connect(redis_urls.connection_url(settings, acl.ADMIN))
    guard = MemoryGuard(
        admin,
        shared_keyring(settings.home),
        max_message_age=settings.max_message_age,
        say=lambda line: print(line, flush=True),
    )
    with contextlib.suppress(StopRequested):
        guard.run_forever()
    return 0


@click.command("flower", cls=Command)
@click.pass_obj
def flower_command(settings: Settings) -> int:
    """Run Flower on 127.0.0.1 with basic auth (replaces this process)."""
    import os

    from xnai_tasks.ops.flower import ensure_credentials, flower_argv, flower_env

    keys_on_first_run(settings)
    creds, new = ensure_credentials(settings)
    if new:
        print(f"Flower credentials (shown once, kept in {settings.home}): {creds.basic_auth}", flush=True)
    argv = flower_argv(settings)
    os.execve(argv[0], argv, flower_env(settings, creds))


@click.command("demo", cls=Command)
@click.pass_obj
def demo_command(settings: Settings) -> int:
    """Start the stack, run a real task on every role, print, stop."""
    from xnai_tasks.demo import run_demo

    return run_demo(settings)
