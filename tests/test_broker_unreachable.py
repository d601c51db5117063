"""A Redis that does not answer: ``xnai up`` and a starting worker say so in one line and exit 6 within 5 s;
a worker that loses Redis later keeps retrying, one log line a try, and serves again when Redis is back.

Real processes: ``xnai up``, ``xnai worker`` and plain ``celery worker`` subprocesses, the embedded Redis
stopped and started again under a running worker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from kombu.exceptions import OperationalError
from redis import RedisError

from xnai_tasks.bench.harness import start_worker, stop_worker
from xnai_tasks.client.sync import Client
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.core.nodes import nodes_online
from xnai_tasks.errors import BrokerUnreachableError
from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security.key_admin import init_keys
from xnai_tasks.settings import Settings

from support import run_xnai, short_home

#: Nobody listens on port 1: the connection is refused at once.
DEAD_URL = "redis://127.0.0.1:1/0"


def timed(args: list[str], settings: Settings) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = run_xnai(args, settings, timeout=60)
    return done, time.monotonic() - started


def test_up_with_an_unreachable_redis_is_one_line_and_exit_6(home: Path) -> None:
    # Given an external Redis URL nobody answers on
    settings = Settings(home=home, redis_url=DEAD_URL)
    # When the whole system is started
    done, elapsed = timed(["up", "--no-flower"], settings)
    # Then it refuses in one line with the broker's exit code, before starting anything, and fast
    assert done.returncode == BrokerUnreachableError.exit_code, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "xnai: broker unreachable at redis://127.0.0.1:1/0: Error 111 connecting to 127.0.0.1:1. Connection refused."
    ]
    assert elapsed < 5.0, elapsed


def test_worker_with_an_unreachable_redis_is_one_line_and_exit_6_within_5_seconds(home: Path) -> None:
    # Given an external Redis URL nobody answers on
    settings = Settings(home=home, redis_url=DEAD_URL)
    # When a role's worker starts
    done, elapsed = timed(["worker", "curation"], settings)
    # Then it does not retry a hundred times: one line, exit 6, within 5 s
    assert done.returncode == 6, done.stderr[-3000:]
    assert elapsed < 5.0, elapsed
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xnai: broker unreachable at redis://127.0.0.1:1/0"), lines


def test_plain_celery_worker_with_an_unreachable_redis_exits_6_before_loading_models(home: Path) -> None:
    # Given an external Redis URL nobody answers on
    settings = Settings(home=home, redis_url=DEAD_URL)
    # When the role's worker is started as plain Celery (README: it works too)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "xnai_tasks", "worker", "-Q", "curation"],
        env={k: v for k, v in os.environ.items() if not k.startswith("XNAI_")} | settings.to_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    # Then it stops at the start-up check with one line of ours (Celery may warn about root before it) and exit 6
    assert done.returncode == 6, done.stderr[-3000:]
    assert elapsed < 5.0, elapsed
    assert "Traceback" not in done.stderr and "Trying again" not in done.stderr, done.stderr[-3000:]
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("xnai worker curation: cannot start: broker unreachable at redis://127.0.0.1:1/0")
    ), done.stderr[-3000:]


def test_worker_of_a_missing_embedded_redis_waits_briefly_then_exits_6(home: Path) -> None:
    # Given the embedded Redis configured but not running
    settings = Settings(home=home)
    # When a worker starts
    done, elapsed = timed(["worker", "copilot"], settings)
    # Then it gives a Redis starting beside it a moment, then refuses in one line, within 5 s
    assert done.returncode == 6, done.stderr[-3000:]
    assert 2.5 < elapsed < 5.0, elapsed
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("xnai: broker unreachable"), done.stderr


def wait_for_node(app: Celery, role: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until ``ROLE@...`` answers ping (Redis may be down meanwhile: that is asked again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the worker exited with {proc.returncode}"
        try:
            if role in nodes_online(app, timeout=0.5):
                return
        except (OperationalError, RedisError, OSError):  # a connection of the Redis that was stopped
            time.sleep(0.5)
    raise AssertionError(f"no {role} worker answered within {timeout} s")


@pytest.fixture
def lazy_settings() -> Iterator[Settings]:
    settings = Settings(home=short_home(), model_mode="lazy")  # nothing to load: the worker starts in seconds
    init_keys(settings.home)
    yield settings
    shutil.rmtree(settings.home, ignore_errors=True)


def test_worker_started_with_its_embedded_redis_waits_for_it(lazy_settings: Settings) -> None:
    # Given a worker started a second before its embedded Redis (the Procfile starts every line at once)
    proc = start_worker(lazy_settings, "copilot")
    try:
        time.sleep(1.0)
        with EmbeddedRedis(lazy_settings):
            app = create_app(lazy_settings, main="xnai_test_wait")
            try:
                # Then the worker did not give up: it comes online
                wait_for_node(app, "copilot", proc, timeout=60)
            finally:
                app.close()
                stop_worker(proc)
    finally:
        stop_worker(proc)


def test_a_worker_that_loses_redis_keeps_retrying_in_one_line_a_try_and_serves_again(
    lazy_settings: Settings,
) -> None:
    # Given a worker online on the embedded Redis
    server = EmbeddedRedis(lazy_settings).start()
    proc = start_worker(lazy_settings, "copilot")
    app = create_app(lazy_settings, main="xnai_test_lost")
    try:
        wait_for_node(app, "copilot", proc, timeout=60)
        # When Redis goes away for a while
        server.stop()
        time.sleep(7.0)
        # Then the worker is still running, retrying
        assert proc.poll() is None, f"the worker exited with {proc.returncode}"
        # And when Redis is back, it reconnects and runs a task
        server = EmbeddedRedis(lazy_settings).start()
        wait_for_node(app, "copilot", proc, timeout=40)
        client = Client(lazy_settings)
        try:
            assert client.submit("copilot", "echo", value="back").get(timeout=30) == "back"
        finally:
            client.close()
    finally:
        app.close()
        stop_worker(proc)
        server.stop()
    # And each try while Redis was gone was one line (Celery's), never a traceback
    log = (lazy_settings.home / "copilot.log").read_text(errors="replace")
    assert "Connection to broker lost" in log, log[-3000:]
    tries = [line for line in log.splitlines() if "Cannot connect to" in line]
    assert len(tries) >= 2, log[-3000:]
    assert len(tries) == log.count("Trying again in"), log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_waiting_for_workers_reports_a_lost_broker_as_unreachable(home: Path) -> None:
    # Given a stack waiting for a worker while its broker does not answer
    settings = Settings(home=home, redis_url=DEAD_URL)
    app = create_app(settings, main="xnai_test_dead")
    try:
        # When it asks who is online, Then the error is the broker's (exit 6), not kombu's
        with pytest.raises(BrokerUnreachableError, match="lost the broker while waiting for the workers"):
            Stack(settings, roles=("grok",)).wait_workers(app, timeout=10)
    finally:
        app.close()
