"""Shared pieces of the benchmarks: a private XNAI_HOME, worker subprocesses, medians, host facts."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
from celery import Celery

from xnai_tasks.core.nodes import nodes_online
from xnai_tasks.errors import ProcessError
from xnai_tasks.ops.proc import die_with_parent
from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security.key_admin import init_keys
from xnai_tasks.settings import Settings


@contextmanager
def private_stack_home(settings: Settings) -> Iterator[Settings]:
    """Settings on a throw-away XNAI_HOME with its own embedded Redis (an external XNAI_REDIS_URL is kept)."""
    home = Path(tempfile.mkdtemp(prefix="xnai-bench-"))
    bench_settings = replace(settings, home=home, cache=False)  # repeated requests must run (see model_stack)
    init_keys(home)
    try:
        if bench_settings.embedded:
            with EmbeddedRedis(bench_settings):
                yield bench_settings
        else:
            yield bench_settings
    finally:
        shutil.rmtree(home, ignore_errors=True)


def child_env(settings: Settings) -> dict[str, str]:
    """Environment for a process that must see the same settings."""
    return {**os.environ, **settings.to_env()}


@contextmanager
def worker_process(
    argv: Sequence[str], settings: Settings, app: Celery, node_prefix: str, extra_env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python ARGV`` as a worker until the block ends, once a node named ``node_prefix@...`` answers."""
    proc = start_worker(settings, node_prefix, env=extra_env, argv=[sys.executable, *argv])
    try:
        wait_online(proc, app, node_prefix, timeout=120)
        yield proc
    finally:
        stop_worker(proc)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def host_facts() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "loadavg_1m": os.getloadavg()[0],
    }


@contextmanager
def model_stack_home(settings: Settings) -> Iterator[Settings]:
    """A throw-away XNAI_HOME with Redis (embedded unless external), keys and ACLs, and the models ready.

    No worker is started: benchmarks start their own with :func:`role_worker`. The default models are
    assembled and checksummed here, so no measurement pays for that.
    """
    with model_stack(settings) as (bench_settings, _):
        yield bench_settings


@contextmanager
def model_stack(settings: Settings) -> Iterator[tuple[Settings, Stack]]:
    """:func:`model_stack_home`, with the running :class:`Stack` (its Redis and guard processes)."""
    from xnai_tasks.models.model_file import resolve_model

    home = Path(tempfile.mkdtemp(prefix="xnai-bench-", dir="/tmp"))
    # the benchmarks repeat requests to measure their runs: the response cache stays off (the load bench
    # switches it per profile, over this)
    bench_settings = replace(settings, home=home, cache=False)
    try:
        with Stack(bench_settings, roles=(), flower=False) as stack:
            resolve_model("gguf", bench_settings)
            resolve_model("encoder", bench_settings)
            yield bench_settings, stack
    finally:
        shutil.rmtree(home, ignore_errors=True)


def start_worker(
    settings: Settings,
    role: str,
    *,
    concurrency: int | None = None,
    env: dict[str, str] | None = None,
    argv: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``xnai worker ROLE`` (or ``argv``) in its own session, output in XNAI_HOME/ROLE.log; no wait."""
    if argv is None:
        argv = [sys.executable, "-m", "xnai_tasks", "worker", role]
        if concurrency is not None:
            argv.append(f"--concurrency={concurrency}")
    with open(settings.home / f"{role}.log", "ab") as log_file:
        return subprocess.Popen(  # our own interpreter
            argv,
            env=child_env(settings) | {"XNAI_LOG_LEVEL": "WARNING"} | (env or {}),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def wait_online(proc: subprocess.Popen[bytes], app: Celery, role: str, timeout: float = 180.0) -> None:
    """Wait until the worker ``proc`` answers ``ping`` as ``ROLE@...``."""
    deadline = time.monotonic() + timeout
    while role not in nodes_online(app, timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ProcessError(f"benchmark worker {role} did not come up (exit code {proc.poll()})")


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Stop a worker started by :func:`start_worker` and everything in its session."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)


@contextmanager
def role_worker(
    settings: Settings,
    app: Celery,
    role: str,
    *,
    concurrency: int | None = None,
    env: dict[str, str] | None = None,
    argv: list[str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A running ``xnai worker ROLE`` (or ``argv``) for the block, online before the block starts."""
    proc = start_worker(settings, role, concurrency=concurrency, env=env, argv=argv)
    try:
        wait_online(proc, app, role)
        yield proc
    finally:
        stop_worker(proc)


def solo_worker_argv(role: str) -> list[str]:
    """Plain ``celery worker`` for one role with the solo pool: one process that loads and runs everything."""
    return [
        sys.executable, "-m", "celery", "-A", "xnai_tasks", "worker", f"--queues={role}", f"--hostname={role}@%h",
        "--pool=solo", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def pss_bytes(pid: int) -> dict[str, int]:
    """PSS of a process and of each of its children (a worker and its pool), by pid."""
    parent = psutil.Process(pid)
    return {proc.pid: int(proc.memory_full_info().pss) for proc in [parent, *parent.children(recursive=True)]}
