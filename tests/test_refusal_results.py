"""A refused message ends visibly: Celery's ``task-rejected`` event, and a signed refusal its caller gets.

Over the real stack: a message the gate refuses used to leave its caller (and Flower) at PENDING forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected, RefusedError
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security import acl, redis_urls
from xnai_tasks.security.gate import REFUSAL_RESULT_TTL_S, REFUSAL_RESULTS_PER_MINUTE
from xnai_tasks.settings import Settings

from support import publish_raw


@pytest.fixture(scope="module")
def conn(stack: Stack, stack_settings: Settings) -> Iterator[redis.Redis]:
    connection = broker.connect(redis_urls.connection_url(stack_settings, acl.ADMIN))
    yield connection
    connection.close()


def refused(conn: redis.Redis, role: str) -> int:
    return sum(int(v) for v in conn.hgetall(c.refused_counter_key(role)).values())


class RejectedEvents(threading.Thread):
    """What Flower hears: a celeryev receiver collecting ``task-rejected`` events by task id."""

    def __init__(self, app: Celery) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.events: dict[str, dict[str, Any]] = {}
        self.ready = threading.Event()
        self.receiver: Any = None

    def run(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"task-rejected": self.on_rejected})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def on_rejected(self, event: dict[str, Any]) -> None:
        self.events[str(event["uuid"])] = event

    def wait_for(self, task_id: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while task_id not in self.events and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.events.get(task_id)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.join(10)


def test_an_unsigned_celery_call_is_refused_to_its_caller_within_seconds(
    stack: Stack, stack_settings: Settings, control_app: Celery, client: Client, conn: redis.Redis
) -> None:
    # Given plain Celery's own `call` command, which signs nothing
    env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}
    env.update(stack_settings.to_env())
    called = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "xnai_tasks", "call", "grok.echo", "--kwargs", '{"value": "x"}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert called.returncode == 0, called.stderr
    task_id = called.stdout.strip().splitlines()[-1]
    started = time.monotonic()
    # When its caller waits on the id, with the project's handle or with plain Celery
    with pytest.raises(RefusedError, match=r"refused \(unsigned\)") as handle_error:
        client.handle(task_id, "grok", "echo").get(timeout=20)
    with pytest.raises(MessageRejected) as plain_error:
        AsyncResult(task_id, app=control_app).get(timeout=20)
    # Then both raise within seconds, one line naming the reason
    assert time.monotonic() - started < 20
    assert "\n" not in str(handle_error.value)
    assert plain_error.value.reason == "unsigned"
    assert str(plain_error.value) == (
        "refused (unsigned): the grok worker refused the message before it ran (xnai status --dead-letters grok)"
    )
    # And what was stored is the worker's fixed refusal, signed by grok, in grok's namespace, expiring
    raw = conn.get(c.result_key("grok", task_id))
    assert raw is not None
    meta = json.loads(raw)
    assert meta["status"] == "FAILURE" and meta["xnai_sig"]["agent"] == "grok"
    assert meta["result"]["exc_message"] == [
        "unsigned",
        "the grok worker refused the message before it ran (xnai status --dead-letters grok)",
    ]
    assert 0 < conn.ttl(c.result_key("grok", task_id)) <= REFUSAL_RESULT_TTL_S


def test_a_refused_message_sends_task_rejected_and_wakes_a_waiting_caller(
    stack: Stack, control_app: Celery, client: Client
) -> None:
    # Given an event receiver, as Flower runs one, and a caller already waiting on a task id
    watcher = RejectedEvents(control_app)
    watcher.start()
    assert watcher.ready.wait(10)
    time.sleep(1.0)  # the receiver's subscription is made in capture()
    task_id = str(uuid.uuid4())
    outcome: list[BaseException] = []
    handle = client.handle(task_id, "grok", "echo")

    def wait() -> None:
        try:
            handle.get(timeout=30)
        except BaseException as exc:  # what the waiting caller got, checked below
            outcome.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.5)
    try:
        # When someone without a key pushes a grok message with that id
        started = time.monotonic()
        publish_raw(control_app, task="grok.echo", queue="grok", kwargs={"value": 1}, task_id=task_id)
        # Then the grok worker sends Celery's task-rejected event for it, with the reason
        event = watcher.wait_for(task_id, 20)
        assert event is not None, "no task-rejected event"
        assert event["reason"] == "unsigned" and event["requeue"] is False
        assert str(event["hostname"]).startswith("grok@")
        # And the waiting caller is refused within seconds, naming the reason
        waiter.join(20)
        assert outcome and isinstance(outcome[0], RefusedError), outcome
        assert "refused (unsigned)" in str(outcome[0])
        assert time.monotonic() - started < 20
    finally:
        watcher.stop()


GARBAGE_IDS = [
    "not-a-uuid",
    "0" * 36,
    f"{uuid.uuid4()}\n",
    f"{uuid.uuid4()}-and-more",
    "x" * 4096,
    "../celery-task-meta-copilot-" + str(uuid.uuid4()),
]


def test_a_garbage_task_id_stores_nothing(stack: Stack, control_app: Celery, conn: redis.Redis, client: Client) -> None:
    # Given refused messages whose task ids are not UUIDs, then one whose id is
    before = refused(conn, "grok")
    for garbage in GARBAGE_IDS:
        publish_raw(control_app, task="grok.echo", queue="grok", task_id=garbage)
    good_id = publish_raw(control_app, task="grok.echo", queue="grok")[0]
    # When the grok worker has refused them all (in order: the good one last)
    with pytest.raises(RefusedError):
        client.handle(good_id, "grok", "echo").get(timeout=20)
    assert refused(conn, "grok") >= before + len(GARBAGE_IDS) + 1
    # Then none of the garbage ids got anything stored, in any namespace
    for garbage in GARBAGE_IDS:
        for role in c.ROLES:
            assert not conn.exists(c.result_key(role, garbage)), (role, garbage[:40])
    assert not conn.keys(f"{c.RESULT_KEY_PREFIX}*not-a-uuid*")


def test_refusal_results_are_capped_per_role_and_minute(stack: Stack, control_app: Celery, conn: redis.Redis) -> None:
    # Given three times the cap of unsigned copilot messages, each with its own UUID
    sent = 3 * REFUSAL_RESULTS_PER_MINUTE
    before = refused(conn, "copilot")
    first_minute = int(time.time() // 60)
    ids = [publish_raw(control_app, task="copilot.echo", queue="copilot")[0] for _ in range(sent)]
    # When the copilot worker has refused them all
    deadline = time.monotonic() + 60
    while refused(conn, "copilot") < before + sent:
        assert time.monotonic() < deadline, refused(conn, "copilot") - before
        time.sleep(0.1)
    time.sleep(1.0)  # the last result is stored right after its refusal is counted
    minutes = int(time.time() // 60) - first_minute + 1
    # Then at most the cap per minute of them got a result; the rest are only dead-lettered and counted
    stored = sum(int(conn.exists(c.result_key("copilot", task_id))) for task_id in ids)
    assert 0 < stored <= REFUSAL_RESULTS_PER_MINUTE * minutes < sent, (stored, minutes)
