"""Facts about the process that runs a task, for the ``health`` task of every role."""

from __future__ import annotations

import os
import socket
from typing import Any

import celery
import psutil


def process_facts(role: str, hostname: str | None, models: list[dict[str, Any]]) -> dict[str, Any]:
    """Real facts of this process: who it is, where it may run, how much memory it holds."""
    proc = psutil.Process()
    return {
        "role": role,
        "hostname": hostname or socket.gethostname(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "rss_bytes": proc.memory_info().rss,
        "models": models,
        "celery_version": celery.__version__,
    }
