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

from xnai_tasks.errors import ProcessError
from xnai_tasks.redis_server import EmbeddedRedis
from xnai_tasks.settings import Settings


@contextmanager
def private_stack_home(settings: Settings) -> Iterator[Settings]:
    """Settings on a throw-away XNAI_HOME with its own embedded Redis (an external XNAI_REDIS_URL is kept)."""
    home = Path(tempfile.mkdtemp(prefix="xnai-bench-"))
    bench_settings = replace(settings, home=home)
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
def worker_process(argv: Sequence[str], settings: Settings, app: Celery, node_prefix: str) -> Iterator[None]:
    """Run a worker subprocess until the block ends; wait until a node named ``node_prefix@...`` answers."""
    log_path = settings.home / f"{node_prefix}.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(  # our own interpreter
            [sys.executable, *argv],
            env=child_env(settings) | {"XNAI_LOG_LEVEL": "WARNING"},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not any(node.startswith(f"{node_prefix}@") for reply in app.control.ping(timeout=0.5) for node in reply):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ProcessError(f"benchmark worker {node_prefix} did not come up")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)


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
