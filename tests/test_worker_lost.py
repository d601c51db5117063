"""A task that kills its worker process is delivered at most XNAI_MAX_DELIVERIES times, then failed and kept.

Real processes throughout: the embedded Redis, a curation worker (prefork, 2 children) that loads the
tests' own task module (``XNAI_TASK_MODULES=xnai_test_tasks``), and the Python client. Every path a
message can take when its worker dies ends with a result or in the dead-letter list, never in limbo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from xnai_tasks.bench.harness import start_worker, stop_worker, wait_online
from xnai_tasks.client.sync import Client
from xnai_tasks.core import constants as c
from xnai_tasks.errors import TaskFailedError
from xnai_tasks.observability.status import collect_status, format_status
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security.keyring import load_signer
from xnai_tasks.settings import Settings

from support import publish_raw, short_home

TESTS_DIR = str(Path(__file__).resolve().parent)
WORKER_ENV = {"PYTHONPATH": TESTS_DIR}


@pytest.fixture(scope="module")
def private_settings() -> Settings:
    # A short visibility timeout, so a message whose whole worker was killed comes back within seconds.
    return Settings(
        home=short_home(),
        model_mode="lazy",
        max_deliveries=3,
        task_modules=("xnai_test_tasks",),
        visibility_timeout=12,
        task_time_limit=10,
        max_message_age=120,
    )


@pytest.fixture(scope="module")
def client(private_client: Client) -> Client:
    import xnai_test_tasks  # noqa: F401  registers curation.die and curation.nap in this process too

    return private_client


@pytest.fixture(scope="module")
def settings(private_settings: Settings) -> Settings:
    return private_settings


@pytest.fixture(scope="module")
def app(private_app: Celery) -> Celery:
    return private_app


@pytest.fixture
def worker(private_stack: Stack, settings: Settings, app: Celery) -> Iterator[subprocess.Popen[bytes]]:
    """A running curation worker with two pool processes."""
    proc = start_worker(settings, "curation", concurrency=2, env=WORKER_ENV)
    try:
        wait_online(proc, app, "curation", timeout=120)
        yield proc
    finally:
        stop_worker(proc)


def runs_of(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def dead_letter_of(admin: redis.Redis, task_id: str) -> dict[str, object] | None:
    for raw in admin.lrange(c.dead_letter_key("curation"), 0, 200):
        entry = json.loads(raw)
        if entry["id"] == task_id:
            return dict(entry)
    return None


def in_limbo(admin: redis.Redis, task_id: str, settle_s: float = 5.0) -> bool:
    """True when the message still waits in the queue or in the unacked hash after ``settle_s`` seconds.

    The result is stored before the message is acknowledged, so a client may see it a moment earlier.
    """
    deadline = time.monotonic() + settle_s
    while _waiting(admin, task_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _waiting(admin, task_id)


def _waiting(admin: redis.Redis, task_id: str) -> bool:
    """True while the message waits in the queue or in the unacked hash."""
    queued = any(task_id.encode() in raw for key in c.queue_keys("curation") for raw in admin.lrange(key, 0, -1))
    unacked = any(task_id.encode() in raw for raw in admin.hvals(c.unacked_key("curation")))
    return queued or unacked


@pytest.mark.parametrize("how", ["SIGILL", "SIGSEGV", "SIGKILL", "exit"])
def test_a_task_that_kills_its_process_is_capped_failed_and_dead_lettered(
    how: str, worker: subprocess.Popen[bytes], client: Client, admin: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    # Given a task that kills the pool process running it, every time, and ordinary work beside it
    runs = tmp_path / "runs"
    before = int(admin.hget(c.refused_counter_key("curation"), "worker_lost") or 0)
    poison = client.submit("curation", "die", how=how, runs_file=str(runs))
    others = [client.submit("curation", "echo", value=i) for i in range(20)]
    # When the client waits for it
    with pytest.raises(TaskFailedError) as failed:
        poison.get(timeout=90)
    # Then it ran exactly XNAI_MAX_DELIVERIES times and failed with one line naming the cause and the count
    cause = "exit code 3" if how == "exit" else how
    line = str(failed.value)
    assert runs_of(runs) == settings.max_deliveries
    assert "worker_lost" in line and cause in line and "died 3 time(s)" in line and "\n" not in line
    # And it is dead-lettered with reason worker_lost, counted, and gone from the queue and the unacked set
    entry = dead_letter_of(admin, poison.id)
    assert entry is not None and entry["reason"] == "worker_lost" and cause in str(entry["detail"])
    assert int(admin.hget(c.refused_counter_key("curation"), "worker_lost") or 0) == before + 1
    assert not in_limbo(admin, poison.id)
    # And the other tasks were not affected
    assert [h.get(timeout=60) for h in others] == list(range(20))
    # And `xnai status` shows the deaths with their cause
    status = collect_status(settings)
    deaths = status["roles"]["curation"]["deaths"]
    assert deaths["by_cause"].get(cause, 0) >= settings.max_deliveries
    assert "worker deaths of curation in the last 10 min" in format_status(status)


def test_a_task_whose_process_died_once_runs_again_and_answers(
    worker: subprocess.Popen[bytes], client: Client, admin: redis.Redis, tmp_path: Path
) -> None:
    # Given a task that kills its process on its first run only
    runs = tmp_path / "runs"
    handle = client.submit("curation", "die", how="SIGSEGV", runs_file=str(runs), times=1)
    # When it is redelivered after the death
    result = handle.get(timeout=60)
    # Then the second run answers, and nothing was dead-lettered
    assert result["runs"] == 2 and runs_of(runs) == 2
    assert dead_letter_of(admin, handle.id) is None


def test_the_cap_holds_across_a_stop_of_the_worker(
    private_stack: Stack, settings: Settings, app: Celery, client: Client, admin: redis.Redis, tmp_path: Path
) -> None:
    # Given a poison task that has already killed one process of a worker
    runs = tmp_path / "runs"
    proc = start_worker(settings, "curation", concurrency=1, env=WORKER_ENV)
    try:
        wait_online(proc, app, "curation", timeout=120)
        handle = client.submit("curation", "die", how="SIGKILL", runs_file=str(runs))
        deadline = time.monotonic() + 60
        while runs_of(runs) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        # When the worker is stopped meanwhile (warm shutdown, as `xnai up` does on Ctrl-C)
        stop_worker(proc)
    # Then the message is not lost: it waits, or it already ended
    assert _waiting(admin, handle.id) or dead_letter_of(admin, handle.id) is not None
    # And when a worker starts again, the count goes on from where it was: it ends failed and dead-lettered
    proc = start_worker(settings, "curation", concurrency=1, env=WORKER_ENV)
    try:
        wait_online(proc, app, "curation", timeout=120)
        with pytest.raises(TaskFailedError, match="worker_lost"):
            handle.get(timeout=90)
    finally:
        stop_worker(proc)
    assert runs_of(runs) <= settings.max_deliveries
    assert dead_letter_of(admin, handle.id) is not None and not in_limbo(admin, handle.id)


def test_a_task_whose_whole_worker_was_killed_comes_back_and_answers(
    private_stack: Stack, settings: Settings, app: Celery, client: Client, admin: redis.Redis, tmp_path: Path
) -> None:
    # Given a task running on a worker
    runs = tmp_path / "runs"
    proc = start_worker(settings, "curation", concurrency=1, env=WORKER_ENV)
    wait_online(proc, app, "curation", timeout=120)
    handle = client.submit("curation", "nap", seconds=2.0, runs_file=str(runs))
    deadline = time.monotonic() + 60
    while runs_of(runs) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    replays_before = int(admin.hget(c.refused_counter_key("curation"), "replay") or 0)
    # When the whole worker (parent and pool) is killed with SIGKILL: no process is left to report it
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _waiting(admin, handle.id)
    # Then a new worker restores it once the visibility timeout has passed, and it answers: the restored
    # copy of a message whose nonce is still "in flight" is not refused as a replay of itself
    proc = start_worker(settings, "curation", concurrency=1, env=WORKER_ENV)
    try:
        wait_online(proc, app, "curation", timeout=120)
        assert handle.get(timeout=90)["runs"] == 2
    finally:
        stop_worker(proc)
    assert not in_limbo(admin, handle.id)
    assert int(admin.hget(c.refused_counter_key("curation"), "replay") or 0) == replays_before


def test_the_gate_refuses_a_copy_delivered_past_the_cap(
    worker: subprocess.Popen[bytes], settings: Settings, app: Celery, admin: redis.Redis
) -> None:
    # Given a signed message whose earlier deliveries all vanished with their workers (3 restores counted)
    copilot = load_signer(settings.home, "copilot")
    task_id = "lost-" + os.urandom(6).hex()
    admin.hset(c.lost_key("curation", task_id, 0), mapping={"redeliveries": 2, "cause": "worker vanished"})

    def mark_redelivered(headers: dict[str, object]) -> None:
        headers["redelivered"] = True

    # When it is delivered once more
    publish_raw(
        app,
        task="curation.echo",
        queue="curation",
        kwargs={"value": "never"},
        signer=copilot,
        mutate=mark_redelivered,
        task_id=task_id,
    )
    # Then the gate refuses it as worker_lost, stores a signed failure, and it never runs
    with pytest.raises(TaskFailedError, match="worker_lost"):
        Client(settings).handle(task_id, "curation", "echo").get(timeout=30)
    entry = dead_letter_of(admin, task_id)
    assert entry is not None and entry["reason"] == "worker_lost"
    assert not in_limbo(admin, task_id)
