"""A role worker whose takes Redis refuses (full: ``maxmemory`` reached, ``noeviction``) waits, loses nothing,
and takes again once Redis accepts writes (resilience/taking.py); a taken message is recorded once, as sent.

Real processes: the embedded Redis (its admin changes ``maxmemory``), one curation worker and a client.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from xnai_tasks.bench.harness import start_worker, stop_worker, wait_online
from xnai_tasks.client.sync import Client
from xnai_tasks.core import constants as c
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import short_home

pytestmark = pytest.mark.slow

ROLE = "curation"
TESTS_DIR = str(Path(__file__).resolve().parent)
#: How long Redis stays full: many of the worker's 0.5 s pauses, far fewer than its warnings' 60 s apart.
FULL_S = 4.0
WAIT_S = 60.0
#: The start of the worker's warning.
REFUSED = "Redis refused this worker's"


@pytest.fixture(scope="module")
def private_settings() -> Settings:
    return Settings(
        home=short_home(), model_mode="lazy", llm_safe="off", cache=False, task_modules=("xnai_test_tasks",)
    )


@pytest.fixture(scope="module")
def worker(private_stack: Stack, private_settings: Settings, private_app: Celery) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_worker(private_settings, ROLE, concurrency=1, env={"PYTHONPATH": TESTS_DIR})
    try:
        wait_online(proc, private_app, ROLE, timeout=120)
        yield proc
    finally:
        stop_worker(proc)


@pytest.fixture
def full(admin: redis.Redis) -> Iterator[Callable[[bool], None]]:
    """Makes Redis full (``maxmemory`` below what it uses) or not; not full again after the test."""
    cap = admin.config_get("maxmemory")["maxmemory"]

    def make_full(on: bool) -> None:
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", str(used // 2) if on else cap)

    yield make_full
    make_full(False)


def log_events(settings: Settings, event: str) -> list[dict[str, Any]]:
    """Every JSON log line of every process with this ``event``."""
    path = settings.log_dir / c.LOG_FILE
    found = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == event:
                found.append(entry)
    return found


def worker_lines(settings: Settings, needle: str) -> list[str]:
    """The lines of the worker's own output (XNAI_HOME/ROLE.log) containing ``needle``."""
    return [line for line in (settings.home / f"{ROLE}.log").read_text(errors="replace").splitlines() if needle in line]


def test_an_idle_worker_outlives_a_full_redis_with_one_warning(
    worker: subprocess.Popen[bytes], private_settings: Settings, private_client: Client, admin: redis.Redis, full: Any
) -> None:
    # Given an idle worker (waiting on its empty queue) and a Redis that evicts nothing
    assert admin.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert private_client.submit(ROLE, "nap", seconds=0).get(timeout=WAIT_S)["runs"] == 0
    before = len(log_events(private_settings, "take_refused")), len(worker_lines(private_settings, REFUSED))
    # When Redis is full for a few seconds (its wait, a write, is refused on every poll)
    full(True)
    with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
        admin.lpush("full-probe", "x")
    time.sleep(FULL_S)
    # Then the worker is alive and said so in one warning line, naming the refusal, not one per poll
    assert worker.poll() is None
    refused = log_events(private_settings, "take_refused")[before[0] :]
    assert len(refused) == 1, refused
    assert len(worker_lines(private_settings, REFUSED)[before[1] :]) == 1
    assert "maxmemory" in refused[0]["msg"] and "nothing taken" in refused[0]["msg"]
    # When Redis accepts writes again, Then a task sent now is answered
    full(False)
    assert private_client.submit(ROLE, "nap", seconds=0).get(timeout=WAIT_S)["runs"] == 0
    assert worker.poll() is None


def test_a_refused_take_leaves_the_message_queued_and_it_is_recorded_once_as_sent(
    worker: subprocess.Popen[bytes], private_settings: Settings, private_client: Client, admin: redis.Redis, full: Any
) -> None:
    # Given a message queued while the worker is paused (its wait is woken, the reply waits in its socket),
    # stored compact: kombu's own encoding of it would differ byte for byte
    queue = c.queue_keys(ROLE)[0]
    before = len(log_events(private_settings, "take_refused"))
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        handle = private_client.submit(ROLE, "nap", seconds=5)
        (item,) = admin.lrange(queue, 0, -1)
        compact = json.dumps(json.loads(item), separators=(",", ":")).encode()
        assert compact != item
        admin.delete(queue)
        admin.lpush(queue, compact)
        tag = json.loads(compact)["properties"]["delivery_tag"]
        # When Redis is full as the worker goes on (its take, a script that writes first, is refused)
        full(True)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    time.sleep(FULL_S)
    # Then its take was refused, the message is still in the queue, held by no one, and the worker is alive
    assert [e["command"] for e in log_events(private_settings, "take_refused")][before:] == ["take"]
    assert admin.lrange(queue, 0, -1) == [compact]
    assert not admin.hexists(c.unacked_key(ROLE), tag)
    assert worker.poll() is None
    # When Redis accepts writes again
    full(False)
    # Then the worker takes it, and its unacked entry is the item as it was queued (not encoded again)
    deadline = time.monotonic() + WAIT_S
    while (entry := admin.hget(c.unacked_key(ROLE), tag)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert entry is not None and entry.startswith(b"[" + compact + b", ")
    info = json.loads(compact)["properties"]["delivery_info"]
    assert json.loads(entry)[1:] == [info["exchange"], info["routing_key"]]
    # and the task is answered
    assert handle.get(timeout=WAIT_S)["runs"] == 0
