"""``honcho start`` runs the Procfile on a fresh XNAI_HOME, as ``xnai up`` does, and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from xnai_tasks.core import constants as c
from xnai_tasks.settings import Settings

from support import free_port

ROOT = Path(__file__).resolve().parent.parent
#: Every line of the Procfile; the models are left to be loaded on first use and not probed, to keep this short.
LINES = ("redis", "guard", "copilot", "cline", "grok", "curation", "flower")


def _lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """honcho's output, read in a thread so that a silent process cannot block the test."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()
    return lines


def _drain(lines: queue.Queue[str], seen: list[str]) -> list[str]:
    while not lines.empty():
        seen.append(lines.get_nowait())
    return seen


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_honcho_starts_the_procfile_on_a_fresh_home(home: Path) -> None:
    # Given a fresh XNAI_HOME: no keys, no Redis passwords, no Flower credentials
    from xnai_tasks.core.celery_app import create_app
    from xnai_tasks.core.nodes import workers_online
    from xnai_tasks.security.key_admin import list_keys
    from xnai_tasks.security.key_store import keyring_path

    settings = Settings(home=home, flower_port=free_port(), metrics_port=free_port(), model_mode="lazy", llm_safe="off")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}
    env.update(settings.to_env(), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    honcho = shutil.which("honcho", path=env["PATH"])
    assert honcho is not None
    # When honcho starts every line of the Procfile at once
    proc = subprocess.Popen(
        [honcho, "start", "-f", str(ROOT / "Procfile"), "-d", str(ROOT), *LINES],
        env=env,
        cwd=home,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines, seen = _lines_of(proc), []
    started: list[psutil.Process] = []
    app = None
    try:
        # Then every role's worker answers the signed ping, and Flower listens
        deadline = time.monotonic() + 75
        online: dict[str, list[str]] = {}
        while set(online) != set(c.ROLES) or not _answers(settings.flower_port):
            assert proc.poll() is None, f"honcho stopped: {_drain(lines, seen)[-25:]}"
            assert time.monotonic() < deadline, f"online: {sorted(online)}; {_drain(lines, seen)[-25:]}"
            if app is None and keyring_path(home).exists():
                app = create_app(settings, main="xnai_test_procfile")
            online = workers_online(app) if app is not None else {}
            time.sleep(0.5)
        assert proc.poll() is None
        assert not [line for line in _drain(lines, seen) if "KeyringError" in line or " stopped (rc=" in line]
        # And the processes that raced to make the keys agreed on one keyring: one key per agent
        assert Counter(row["agent"] for row in list_keys(home)) == dict.fromkeys(c.AGENTS, 1)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("redis-server" in " ".join(p.cmdline()) for p in started)
    finally:
        if app is not None:
            app.close()
        # When honcho's process group gets SIGTERM (honcho passes it on to each line's own process group)
        family = _family(proc.pid, started)
        with contextlib.suppress(ProcessLookupError):  # honcho may have stopped by itself
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(45)
        finally:
            # Then every process it started is gone (anything left is killed, and fails the test)
            _gone, alive = psutil.wait_procs(family, timeout=30)
            left = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
            for leftover in left:
                leftover.kill()
    assert not left, [p.cmdline() for p in left]
    assert not settings.redis_socket.exists()


def _family(pid: int, known: list[psutil.Process]) -> list[psutil.Process]:
    """honcho and every process under it now, and those seen before (a process that outlived its parent)."""
    try:
        root = psutil.Process(pid)
        found = [root, *root.children(recursive=True)]
    except psutil.Error:
        found = []
    return found + [p for p in known if p not in found]
