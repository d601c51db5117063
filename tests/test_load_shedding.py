"""Load shedding at submit, on real processes: a role queue's cap is checked atomically with the push (ACLs on),
a refused submit says when to come back, an expired message is dropped unrun and counted, and a caller may ask
to be refused when no worker of the role is online.

One stack: the embedded Redis with its ACLs and one curation worker of one pool process. grok and cline have no
worker, so what their queues hold is exactly what was accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import states

from xnai_tasks.admission.throughput import NO_RATE_RETRY_S, recent_rate, retry_after_s
from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import NoWorkerError, OverloadedError, RefusedError, SettingsError
from xnai_tasks.observability.status import refusal_counts
from xnai_tasks.observability.telemetry import read_records
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security.redis_urls import connection_url
from xnai_tasks.settings import Settings

from support import admin_connection, free_port, run_xnai, running_stack, short_home

#: grok's cap; the burst offers BURST_PROCS x BURST_EACH submits at once.
CAP = 6
BURST_PROCS = 4
BURST_EACH = 6

#: One burst process: submit BURST_EACH echo tasks to grok as soon as the go-file exists; print what happened.
BURST_SCRIPT = """
import json, sys, time
from pathlib import Path
from xnai_tasks.client.sync import Client
from xnai_tasks.errors import OverloadedError
from xnai_tasks.settings import Settings

client = Client(Settings.from_env())
with client.signing():  # connected and keys loaded before the burst
    pass
print("ready", flush=True)
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.001)
accepted, refused = [], []
for i in range(int(sys.argv[2])):
    try:
        accepted.append(client.submit("grok", "echo", value=i).id)
    except OverloadedError as err:
        refused.append({"retry_after_s": err.retry_after_s, "cap": err.cap, "line": str(err)})
print(json.dumps({"accepted": accepted, "refused": refused}), flush=True)
client.close()
"""


@pytest.fixture(scope="module")
def settings() -> Iterator[Settings]:
    home = short_home()
    yield Settings(
        home=home,
        metrics_port=free_port(),
        model_mode="lazy",
        llm_safe="off",
        plan_overrides='{"curation": {"processes": 1}}',
        queue_caps=(("grok", CAP),),
    )
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings, ("curation",)) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Stack, settings: Settings) -> Iterator[Client]:
    made = Client(settings)
    yield made
    made.close()


@pytest.fixture(scope="module")
def admin(stack: Stack, settings: Settings) -> Iterator[redis.Redis]:
    with admin_connection(settings) as conn:
        yield conn


@pytest.fixture
def empty_queues(admin: redis.Redis) -> Iterator[None]:
    """grok's and cline's queues empty before and after the test (nothing consumes them)."""
    keys = [*c.queue_keys("grok"), *c.queue_keys("cline")]
    admin.delete(*keys)
    yield
    admin.delete(*keys)


def queued_ids(admin: redis.Redis, queue: str) -> list[str]:
    """The task ids of the messages waiting in ``queue``."""
    return [json.loads(raw)["headers"]["id"] for key in c.queue_keys(queue) for raw in admin.lrange(key, 0, -1)]


def fill_to_cap(client: Client) -> None:
    """Submit to grok until its queue refuses."""
    with pytest.raises(OverloadedError):
        for i in range(CAP + 1):
            client.submit("grok", "echo", value=i)


def burst(settings: Settings, tmp_path: Path) -> list[dict[str, list[object]]]:
    """BURST_PROCS processes submit BURST_EACH tasks each to grok at the same moment; what each saw."""
    go = tmp_path / "go"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}, **settings.to_env()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BURST_SCRIPT, str(go), str(BURST_EACH)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(BURST_PROCS)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go.touch()
        return [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_a_burst_is_cut_at_the_cap_atomically(
    settings: Settings, admin: redis.Redis, empty_queues: None, tmp_path: Path
) -> None:
    # Given grok's queue capped at CAP, no grok worker, and a watcher of its depth
    depths: list[int] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            depths.append(broker.queue_depth(admin, "grok"))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # When several processes submit BURST_PROCS x BURST_EACH tasks at once, as the copilot's ACL user
    try:
        seen = burst(settings, tmp_path)
    finally:
        watching.set()
        watcher.join()
    accepted = [task_id for one in seen for task_id in one["accepted"]]
    refused = [item for one in seen for item in one["refused"]]
    # Then exactly CAP are accepted and the rest refused, each with a positive retry-after, in one line
    assert len(accepted) == CAP and len(refused) == BURST_PROCS * BURST_EACH - CAP
    for item in refused:
        assert isinstance(item, dict) and item["retry_after_s"] > 0 and item["cap"] == CAP
        assert "\n" not in item["line"] and f"cap is {CAP}" in item["line"] and "retry after" in item["line"]
    # And the queue holds exactly the accepted ones (nothing refused left behind), never more than the cap
    assert sorted(queued_ids(admin, "grok")) == sorted(str(task_id) for task_id in accepted)
    assert max(depths) <= CAP
    # And the pushes went through the copilot's ACL user, which may not even read a role queue
    copilot = broker.connect(connection_url(settings, "copilot"))
    with pytest.raises(redis.exceptions.NoPermissionError):
        copilot.lrange("grok", 0, -1)
    copilot.close()


def test_cli_submit_over_the_cap_exits_3_in_one_line(
    settings: Settings, client: Client, admin: redis.Redis, empty_queues: None
) -> None:
    # Given grok's queue at its cap
    fill_to_cap(client)
    # When the CLI submits one more
    done = run_xnai(["submit", "grok", "echo", "--kwargs", '{"value": 1}'], settings)
    # Then it exits 3 with one line naming the cap and when to retry, and nothing more is queued
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cap is {CAP}" in lines[0] and f"retry after {NO_RATE_RETRY_S:g} s" in lines[0]
    assert done.stdout == ""
    assert broker.queue_depth(admin, "grok") == CAP


def test_an_expired_message_is_dropped_unrun_and_counted(
    settings: Settings, client: Client, admin: redis.Redis
) -> None:
    # Given the one curation process busy with a slow task
    before = refusal_counts(admin, "curation").get("deadline", 0)
    blocker = client.submit("curation", "echo", value="slow", delay_s=3)
    deadline = time.monotonic() + 60
    while blocker.state != states.STARTED and time.monotonic() < deadline:
        time.sleep(0.05)
    # When a task that expires in half a second waits behind it
    late = client.submit("curation", "echo", value="late", expires_s=0.5)
    # Then its caller is refused (deadline) in one line, and it is counted and dead-lettered
    with pytest.raises(RefusedError) as err:
        late.get(timeout=60)
    assert "deadline" in str(err.value) and "\n" not in str(err.value)
    assert refusal_counts(admin, "curation").get("deadline", 0) == before + 1
    kept = [json.loads(raw) for raw in admin.lrange(c.dead_letter_key("curation"), 0, -1)]
    assert any(item.get("id") == late.id and item.get("reason") == "deadline" for item in kept)
    # And it never ran, while the task before it did
    assert blocker.get(timeout=60) == "slow"
    time.sleep(0.5)  # the blocker's telemetry line is written after its result
    ran = {record.task_id for record in read_records(settings.telemetry_dir)}
    assert blocker.id in ran and late.id not in ran


def test_require_worker_refuses_when_no_worker_is_online(
    settings: Settings, client: Client, admin: redis.Redis, empty_queues: None
) -> None:
    # Given no cline worker
    # When a task is submitted to cline asking for a worker, from the API and the CLI
    with pytest.raises(NoWorkerError) as err:
        client.submit("cline", "echo", value=1, require_worker=True)
    done = run_xnai(["submit", "cline", "echo", "--require-worker"], settings)
    # Then both are refused in one line naming the role, exit 3, and nothing is queued
    assert "\n" not in str(err.value) and "no cline worker" in str(err.value)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no cline worker" in lines[0]
    assert broker.queue_depth(admin, "cline") == 0
    # And without the flag the task queues, as Celery users expect; with a worker online it runs
    client.submit("cline", "echo", value=2)
    assert broker.queue_depth(admin, "cline") == 1
    assert client.submit("curation", "echo", value=3, require_worker=True).get(timeout=60) == 3


class Counts:
    """A stand-in for Redis' MGET over the throughput buckets (pure logic)."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def mget(self, keys: list[str]) -> list[bytes | None]:
        return [str(self.counts[k]).encode() if k in self.counts else None for k in keys]


def test_retry_after_follows_the_recent_throughput() -> None:
    # Given a role that ended 40 tasks in the bucket 20 s ago and 40 in the one 10 s ago, 5 s into this one
    now = 1000 * c.THROUGHPUT_BUCKET_S + 5
    counts = Counts({c.throughput_key("grok", 998): 40, c.throughput_key("grok", 999): 40})
    # When its rate is read, Then it is over the time since its oldest counted bucket began (80 in 25 s)
    rate = recent_rate(counts, "grok", now=now)
    assert rate == 80 / 25
    # And a refused caller at a queue of 32 is told to come back once the queue is worked through (10 s),
    # a minute when nothing ended lately, never less than a second
    assert retry_after_s(32, rate) == 10
    assert recent_rate(Counts({}), "grok", now=now) is None
    assert retry_after_s(32, None) == NO_RATE_RETRY_S
    assert retry_after_s(1, 1000.0) == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [("XNAI_MAX_QUEUE", "-1"), ("XNAI_MAX_QUEUE", "lots"), ("XNAI_MAX_QUEUE_GROK", "1e9"), ("XNAI_TASK_EXPIRES", "0")],
)
def test_nonsense_caps_are_refused(name: str, value: str, tmp_path: Path) -> None:
    # Given a nonsense cap or expiry, When settings are read, Then one line names the variable
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({"XNAI_HOME": str(tmp_path), name: value})
