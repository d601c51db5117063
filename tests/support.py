"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from xnai_tasks.settings import Settings


def short_home() -> Path:
    """A fresh XNAI_HOME with a short path (unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="xnai-t-", dir="/tmp"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_xnai(
    args: list[str], settings: Settings | None = None, *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the ``xnai`` command in a subprocess with the given settings (or raw environment)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}
    if settings is not None:
        full_env.update(settings.to_env())
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "xnai_tasks", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
