"""``xnai up`` runs the Procfile's processes and leaves none behind on SIGINT or SIGTERM."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from xnai_tasks.ops.supervisor import render_procfile
from xnai_tasks.settings import Settings

from support import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_procfile_is_what_xnai_up_runs() -> None:
    # The Procfile (for honcho) and `xnai up` come from one list of processes
    assert (ROOT / "Procfile").read_text() == render_procfile()


def _wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float) -> list[str]:
    """Read the process's stdout (in a thread, so a silent process cannot block us) until ``text``."""
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=0.5))
        except queue.Empty:
            assert proc.poll() is None, f"xnai up exited early: {seen[-20:]}"
            continue
        if text in seen[-1]:
            return seen
    raise AssertionError(f"no {text!r} within {timeout} s: {seen[-20:]}")


@pytest.mark.parametrize(
    ("sig", "args"), [(signal.SIGTERM, ["--no-flower"]), (signal.SIGINT, ["--roles", "cline,grok"])]
)
def test_up_stops_everything_on_signal(home: Path, sig: signal.Signals, args: list[str]) -> None:
    # Given `xnai up` running until ready
    settings = Settings(home=home, flower_port=free_port(), metrics_port=free_port())
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}, **settings.to_env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xnai_tasks", "up", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = _wait_for_line(proc, "xnai up: ready", 120)
        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "redis-server" in names and "worker" in names
        if "--no-flower" not in args:
            assert "flower" in names and any("Flower credentials" in line for line in lines)
        # When the signal arrives
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        # Then no process it started is left
        time.sleep(0.5)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [p.cmdline() for p in left]
        assert not settings.redis_socket.exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_children_do_not_outlive_a_killed_up(home: Path) -> None:
    # Given `xnai up` running until ready
    settings = Settings(home=home, flower_port=free_port(), metrics_port=free_port())
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}, **settings.to_env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xnai_tasks", "up", "--no-flower", "--roles", "cline"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    _wait_for_line(proc, "xnai up: ready", 120)
    started = psutil.Process(proc.pid).children(recursive=True)
    # When it is killed with SIGKILL, so it cannot stop anything itself
    proc.kill()
    proc.wait(10)
    # Then its children stop anyway (the kernel signals them when their parent dies)
    _gone, alive = psutil.wait_procs(started, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline() for p in alive]


def test_up_restarts_a_worker_that_dies_and_keeps_the_rest_running(home: Path) -> None:
    # Given `xnai up` running a curation worker
    from xnai_tasks.core.celery_app import create_app
    from xnai_tasks.core.nodes import workers_online

    settings = Settings(home=home, flower_port=free_port(), metrics_port=free_port(), model_mode="lazy")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}, **settings.to_env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xnai_tasks", "up", "--no-flower", "--roles", "curation"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()

    def wait_for(text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert proc.poll() is None, "xnai up exited"
                continue
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout} s")

    app = create_app(settings, main="xnai_test_restart")
    try:
        wait_for("xnai up: ready", 120)
        (worker,) = [p for p in psutil.Process(proc.pid).children() if "worker" in " ".join(p.cmdline())]
        # When the worker is killed with SIGKILL
        os.kill(worker.pid, signal.SIGKILL)
        # Then `xnai up` says so in one line, starts it again, and the role answers again
        assert "killed by SIGKILL" in wait_for("xnai up: curation exited", 30)
        wait_for("xnai up: curation restarted", 30)
        deadline = time.monotonic() + 90
        while not workers_online(app).get("curation"):
            assert time.monotonic() < deadline, "the restarted curation worker never answered"
        assert proc.poll() is None
        # And a stop signal still stops everything
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        app.close()
        if proc.poll() is None:
            proc.kill()
