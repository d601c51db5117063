"""``xnai bench redis-restart``: the embedded Redis is killed (SIGKILL) under ``xnai up`` while tasks are in flight.

``xnai up --roles curation --no-flower`` runs on a private XNAI_HOME (no model is loaded: the tasks are ``echo``
with a delay, every tenth a slow one, so some are running when Redis dies). ``--tasks`` tasks are submitted;
once a third of them have answered, redis-server is killed and ``xnai up`` starts it again. Every result is
waited for with ``TaskHandle.get`` (signature checked). Reported: seconds from the kill to the first and to the
last result stored after it (the results' ``date_done``; the work left at the kill, over the pool processes, is
a floor for the last), seconds until ``xnai up`` said Redis was back, ``lost``
(tasks with no verified result within :data:`RESULT_BOUND_S`), and the supervisor's lines about Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from xnai_tasks.bench.harness import host_facts
from xnai_tasks.bench.options import BenchOptions
from xnai_tasks.client.sync import Client, TaskHandle
from xnai_tasks.core import constants as c
from xnai_tasks.errors import ProcessError, UsageError, XnaiError
from xnai_tasks.settings import Settings

#: Every SLOW_EVERY-th task sleeps SLOW_S (running when Redis dies), the others FAST_S.
SLOW_EVERY = 10
SLOW_S = 1.0
FAST_S = 0.02
#: Redis is killed once this share of the tasks has answered.
KILL_AFTER = 1 / 3
#: Seconds after the kill within which every result must have arrived; what has not is lost.
RESULT_BOUND_S = 180.0
START_TIMEOUT_S = 180.0
READY = "xnai up: ready"
REDIS_BACK = "xnai up: redis restarted"


class UpProcess:
    """``xnai up ARGS`` in a subprocess for a ``with`` block; its stdout lines are read as they come (a thread)."""

    def __init__(self, settings: Settings, args: list[str], env: dict[str, str] | None = None) -> None:
        self.settings = settings
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}
        full_env.update(settings.to_env())
        full_env.update(env or {})
        with open(settings.home / "up.err", "ab") as err:
            self.proc = subprocess.Popen(  # our own interpreter and module
                [sys.executable, "-m", "xnai_tasks", "up", *args],
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: list[tuple[float, str]] = []
        self._fresh: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout or []:
            self._fresh.put((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float) -> tuple[float, str]:
        """The first line from now on containing ``text`` (when it was read, the line); ProcessError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen = self._fresh.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise ProcessError(f"xnai up exited ({self.proc.returncode}): {self.said()[-10:]}") from None
                continue
            self.lines.append(seen)
            if text in seen[1]:
                return seen
        raise ProcessError(f"xnai up did not say {text!r} within {timeout:.0f} s: {self.said()[-10:]}")

    def said(self) -> list[str]:
        """Every line read so far."""
        while not self._fresh.empty():
            self.lines.append(self._fresh.get())
        return [line for _, line in self.lines]

    def redis_pid(self) -> int:
        """The pid of the embedded redis-server (its pid file)."""
        return int((self.settings.redis_dir / c.REDIS_PIDFILE).read_text().strip())

    def __enter__(self) -> UpProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def bench_settings(settings: Settings, processes: int) -> Iterator[Settings]:
    """A throw-away XNAI_HOME (short: it holds the Redis socket) for a stack that loads no model."""
    if not settings.embedded:
        raise UsageError("xnai bench redis-restart kills the embedded Redis: unset XNAI_REDIS_URL")
    home = Path(tempfile.mkdtemp(prefix="xnai-bench-", dir="/tmp"))
    try:
        yield replace(
            settings,
            home=home,
            model_mode="lazy",
            llm_safe="off",
            telemetry_days=0,
            flower_port=free_port(),
            metrics_port=free_port(),
            plan_overrides=json.dumps({"curation": {"processes": processes}}),
            max_queue=0,  # every task is queued at once: no load shedding here
            queue_caps=(),
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_redis_restart(settings: Settings, options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark and return its report."""
    with (
        bench_settings(settings, options.concurrency) as bench,
        UpProcess(bench, ["--roles", "curation", "--no-flower"]) as up,
    ):
        up.wait_for(READY, START_TIMEOUT_S)
        client = Client(bench)
        try:
            measured = _measure(client, up, options.tasks, options.concurrency)
        finally:
            client.close()
    return {
        "benchmark": "redis-restart",
        "tasks": options.tasks,
        "processes": options.concurrency,
        **measured,
        "host": host_facts(),
    }


def _delay(i: int) -> float:
    return SLOW_S if i % SLOW_EVERY == 0 else FAST_S


def _measure(client: Client, up: UpProcess, tasks: int, processes: int) -> dict[str, Any]:
    handles = [client.submit("curation", "echo", value=i, delay_s=_delay(i)) for i in range(tasks)]
    before = max(1, int(tasks * KILL_AFTER))
    for handle in handles[:before]:
        handle.get(timeout=RESULT_BOUND_S)
    killed_wall, killed = time.time(), time.monotonic()
    os.kill(up.redis_pid(), signal.SIGKILL)
    answered = _collect(handles, deadline=killed + RESULT_BOUND_S)
    back_at = (_said(up, REDIS_BACK) or up.wait_for(REDIS_BACK, 10.0))[0]
    done = {i: _done_at(client, h) for i, h in enumerate(handles) if h.id in answered}
    stored_after = sorted(t - killed_wall for t in done.values() if t > killed_wall)
    return {
        "answered_before_kill": len(done) - len(stored_after),
        # the work left at the kill, spread over the pool: what the last result would take with no outage at all
        "seconds_of_work_left": round(sum(_delay(i) for i, t in done.items() if t > killed_wall) / processes, 3),
        "seconds_to_redis_back": round(back_at - killed, 3),
        "seconds_to_first_result": round(stored_after[0], 3) if stored_after else None,
        "seconds_to_last_result": round(stored_after[-1], 3) if stored_after else None,
        "lost": tasks - len(answered),
        "supervisor": [line for line in up.said() if "xnai up: redis" in line],
    }


def _said(up: UpProcess, text: str) -> tuple[float, str] | None:
    up.said()
    return next((seen for seen in up.lines if text in seen[1]), None)


def _collect(handles: list[TaskHandle], *, deadline: float) -> set[str]:
    """The ids whose verified result (the value sent) arrived before ``deadline``."""
    answered: set[str] = set()
    for i, handle in enumerate(handles):
        with contextlib.suppress(XnaiError):
            if handle.get(timeout=max(0.1, deadline - time.monotonic())) == i:
                answered.add(handle.id)
    return answered


def _done_at(client: Client, handle: TaskHandle) -> float:
    """When the task's result was stored (its ``date_done``), as a UNIX time."""
    done = client.app.AsyncResult(handle.id).date_done
    return float(done.timestamp()) if done is not None else 0.0
