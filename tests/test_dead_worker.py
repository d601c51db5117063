"""A dead host's tasks come back within XNAI_DEAD_AFTER seconds, not the visibility timeout (an hour here).

Real processes: the embedded Redis with its ACLs, curation workers started as plain ``celery worker`` with node
names of their own (``curation@a``, ``curation@b``...), each with two pool processes, loading the tests' task module
(``curation.nap`` sleeps, then answers with its pid and writes one line per run), and the Python client. A worker
is killed (SIGKILL of its whole process group: nothing is left to say goodbye) or paused (SIGSTOP past
XNAI_DEAD_AFTER, then SIGCONT). Timings are printed, never asserted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery import Celery, states
from kombu import Connection

import celeryconfig
from xnai_tasks.bench.harness import start_worker, stop_worker
from xnai_tasks.client.sync import Client, TaskHandle
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.core.nodes import nodes_online
from xnai_tasks.errors import SettingsError
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.resilience import dead_workers
from xnai_tasks.resilience.reconnect import KeepingChannel, give_back
from xnai_tasks.security import redis_urls
from xnai_tasks.security.keyring import load_signer
from xnai_tasks.security.result_store import Outcome, ResultStore, Riders
from xnai_tasks.settings import Settings

from support import log_events, publish_raw, run_xnai, short_home

TESTS_DIR = str(Path(__file__).resolve().parent)
WORKER_ENV = {"PYTHONPATH": TESTS_DIR}
DEAD_AFTER_S = 5
#: Long enough that the killed or paused worker's tasks are still running when it goes.
NAP_S = 8.0
#: The most any wait below may take (a hang guard: the visibility timeout, 3600 s, would be far longer).
WAIT_S = 120.0
ROLE = "curation"


@pytest.fixture(scope="module")
def private_settings() -> Settings:
    return Settings(
        home=short_home(),
        model_mode="lazy",
        llm_safe="off",
        cache=False,
        task_modules=("xnai_test_tasks",),
        dead_after=DEAD_AFTER_S,
    )


@pytest.fixture(scope="module")
def client(private_client: Client) -> Client:
    import xnai_test_tasks  # noqa: F401  registers curation.nap in this process too

    return private_client


@pytest.fixture
def clean(admin: redis.Redis) -> Iterator[None]:
    """Each test starts and ends with no queued, unacked or held message of the role, no instance registered and no
    death recorded."""
    _clear(admin)
    yield
    _clear(admin)


def _clear(admin: redis.Redis) -> None:
    keys = [*c.queue_keys(ROLE), c.unacked_key(ROLE), c.unacked_index_key(ROLE), c.alive_key(ROLE), c.deaths_key(ROLE)]
    keys += [k for pattern in (c.held_pattern(ROLE), c.fenced_pattern(ROLE)) for k in admin.keys(pattern)]
    admin.delete(*keys)


# ---- helpers: nodes, runs, logs ----


def node_argv(name: str, concurrency: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "xnai_tasks", "worker", f"--queues={ROLE}", f"--hostname={ROLE}@{name}",
        f"--concurrency={concurrency}", "--pool=prefork", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


@contextmanager
def node(
    settings: Settings, app: Celery, name: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A curation worker named ``curation@NAME`` (its own process group, ``env`` added), online for the block."""
    proc = start_worker(settings, f"{ROLE}-{name}", env=WORKER_ENV | (env or {}), argv=node_argv(name))
    try:
        deadline = time.monotonic() + WAIT_S
        while f"{ROLE}@{name}" not in nodes_online(app, timeout=0.5).get(ROLE, []):
            assert proc.poll() is None and time.monotonic() < deadline, f"{ROLE}@{name} did not come up"
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a paused worker must be able to stop
        stop_worker(proc)


def pool_pids(proc: subprocess.Popen[bytes]) -> set[int]:
    return {child.pid for child in psutil.Process(proc.pid).children(recursive=True)}


def runs(path: Path) -> list[int]:
    """The pid of each run of the task writing ``path``."""
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def wait_until(check: Callable[[], bool], what: str, within_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"not seen within {within_s} s: {what}"
        time.sleep(0.2)


def stored_result(admin: redis.Redis, task_id: str) -> dict[str, Any]:
    raw = admin.get(c.result_key(ROLE, task_id))
    assert raw is not None
    return dict(json.loads(raw))


def submit_naps(client: Client, home: Path, count: int, seconds: float, tag: str) -> list[tuple[TaskHandle, Path]]:
    made = []
    for i in range(count):
        path = home / f"runs-{tag}-{i}"
        made.append((client.submit(ROLE, "nap", seconds=seconds, runs_file=str(path)), path))
    return made


def publish_nap(app: Celery, settings: Settings, seconds: float, path: Path, *, time_limit_s: int) -> str:
    """A signed ``curation.nap`` message with time limits of its own (Celery's ``timelimit`` header, which the
    signature does not cover and the worker honours over XNAI_TASK_TIME_LIMIT); its task id."""

    def limit(headers: dict[str, Any]) -> None:
        headers["timelimit"] = [time_limit_s, time_limit_s - 1]

    kwargs = {"seconds": seconds, "runs_file": str(path)}
    copilot = load_signer(settings.home, "copilot")
    task_id, _, _ = publish_raw(app, task=f"{ROLE}.nap", queue=ROLE, kwargs=kwargs, signer=copilot, mutate=limit)
    return task_id


def server_time(conn: redis.Redis) -> float:
    seconds, micros = conn.time()
    return float(seconds) + float(micros) / 1e6


def fabricate_holder(admin: redis.Redis, instance: str, raw_item: bytes, *, beat_at: float) -> str:
    """Record a queue item as taken by ``instance`` (as KeepingQoS.append would) with a heartbeat at ``beat_at``;
    return its delivery tag."""
    payload = json.loads(raw_item)
    tag = str(payload["properties"]["delivery_tag"])
    pipe = admin.pipeline(transaction=True)
    pipe.zadd(c.unacked_index_key(ROLE), {tag: time.time()})
    pipe.hset(c.unacked_key(ROLE), tag, json.dumps([payload, ROLE, ROLE]))
    pipe.sadd(c.held_key(ROLE, instance), tag)
    pipe.zadd(c.alive_key(ROLE), {instance: beat_at})
    pipe.execute()
    return tag


# ---- the tests ----


def test_a_killed_workers_tasks_come_back_within_dead_after_and_run_once_on_the_live_one(
    clean: None, private_settings: Settings, private_app: Celery, client: Client, admin: redis.Redis
) -> None:
    home = private_settings.home
    with node(private_settings, private_app, "a") as a, node(private_settings, private_app, "b") as b:
        # Given two workers of one role, each running two slow tasks (two pool processes, prefetch 1 each)
        naps = submit_naps(client, home, 4, NAP_S, "kill")
        wait_until(lambda: all(runs(path) for _, path in naps), "every task started")
        on_a = [(handle, path) for handle, path in naps if runs(path)[0] in pool_pids(a)]
        on_b = [(handle, path) for handle, path in naps if runs(path)[0] in pool_pids(b)]
        assert len(on_a) == 2 and len(on_b) == 2
        b_pool = pool_pids(b)

        # When worker a's whole process group is killed with SIGKILL: no process is left to give anything back
        killed_at, killed_wall = time.monotonic(), time.time()
        os.killpg(a.pid, signal.SIGKILL)

        # Then every task answers, a's two run again on b, b's own two are never restored and run once
        results = {handle.id: handle.get(timeout=WAIT_S) for handle, _ in naps}
        last_s = time.monotonic() - killed_at
        for handle, path in on_a:
            assert results[handle.id]["pid"] in b_pool
            assert runs(path)[1:] == [results[handle.id]["pid"]]
        for handle, path in on_b:
            assert runs(path) == [results[handle.id]["pid"]]
        restores = [
            e for e in log_events(private_settings, "dead_worker_restored") if e["instance"].startswith(f"{ROLE}@a#")
        ]
        assert [e["restored"] for e in restores] == [2]
        assert restores[0]["msg"].startswith(f"restored 2 message(s) of dead worker {ROLE}@a (no heartbeat for ")
        # and nothing is left taken: b acknowledged everything, a's heartbeat and held set are gone
        wait_until(lambda: not admin.hlen(c.unacked_key(ROLE)), "no unacked message")
        assert not admin.keys(c.held_pattern(ROLE))
        assert [dead_workers.instance_node(m.decode()) for m in admin.zrange(c.alive_key(ROLE), 0, -1)] == [f"{ROLE}@b"]
        # and `xnai status` shows it: two messages taken back from a silent curation worker in the last 10 minutes
        shown = run_xnai(["status"], private_settings)
        assert shown.returncode == 0, shown.stderr
        assert f"worker deaths of {ROLE} in the last 10 min: 2 ({dead_workers.SILENT_CAUSE} 2)" in shown.stdout
        restored_s = datetime.fromisoformat(restores[0]["ts"]).timestamp() - killed_wall
        print(f"\nkill -> restored: {restored_s:.1f} s, last result: {last_s:.1f} s (dead after {DEAD_AFTER_S} s)")


def test_a_paused_worker_is_fenced_and_its_late_results_never_replace_the_live_ones(
    clean: None, private_settings: Settings, private_app: Celery, client: Client, admin: redis.Redis
) -> None:
    home = private_settings.home
    with node(private_settings, private_app, "p") as paused, node(private_settings, private_app, "q") as live:
        # Given two workers of one role, each running two slow tasks
        naps = submit_naps(client, home, 4, NAP_S, "pause")
        wait_until(lambda: all(runs(path) for _, path in naps), "every task started")
        on_p = [(handle, path) for handle, path in naps if runs(path)[0] in pool_pids(paused)]
        assert len(on_p) == 2
        p_pool, q_pool = pool_pids(paused), pool_pids(live)

        # When worker p (parent and pool) is paused past XNAI_DEAD_AFTER, until q has started its two tasks again
        os.killpg(paused.pid, signal.SIGSTOP)
        wait_until(lambda: all(len(runs(path)) == 2 for _, path in on_p), "p's tasks started again on q")
        # and then carries on: its pool finishes the two stale runs while q's copies still run
        os.killpg(paused.pid, signal.SIGCONT)

        # Then every task's result is q's
        results = {handle.id: handle.get(timeout=WAIT_S) for handle, _ in naps}
        for handle, _ in on_p:
            assert results[handle.id]["pid"] in q_pool
        # and p's late results were refused by its fence, one line each, and replaced nothing
        stale = {handle.id for handle, _ in on_p}
        wait_until(lambda: stale <= {e.get("task_id") for e in log_events(private_settings, "result_fenced")}, "fenced")
        fenced = [e for e in log_events(private_settings, "result_fenced") if e.get("task_id") in stale]
        assert {e["pid"] for e in fenced} <= p_pool
        assert fenced[0]["msg"] == (
            f"not storing the result of task {fenced[0]['task_id']}: its message was given to another worker after a "
            f"peer declared this one ({ROLE}@p) dead"
        )
        for handle, _ in on_p:
            stored = stored_result(admin, handle.id)
            assert stored["status"] == "SUCCESS" and stored["result"]["pid"] == results[handle.id]["pid"]
        # and p's late acknowledgements left q's entries alone: nothing stays unacked, nothing was delivered again
        wait_until(lambda: not admin.hlen(c.unacked_key(ROLE)), "no unacked message")
        assert all(len(runs(path)) == 2 for _, path in on_p)
        # and p registered again, saying so in one line
        fences = [e for e in log_events(private_settings, "worker_fenced") if e["pid"] == paused.pid]
        assert fences and fences[0]["fenced"] == 2
        assert fences[0]["msg"].startswith(f"this worker ({ROLE}@p) was declared dead by a peer while it was silent")

        # When q stops (cleanly: holding nothing, it leaves the alive set itself), Then p goes on working
        stop_worker(live)
        alive = [dead_workers.instance_node(m.decode()) for m in admin.zrange(c.alive_key(ROLE), 0, -1)]
        assert alive == [f"{ROLE}@p"]
        after = submit_naps(client, home, 1, 0.1, "after")[0]
        assert after[0].get(timeout=WAIT_S)["pid"] in p_pool


def test_a_fenced_workers_parent_stores_no_result_of_a_task_a_peer_runs(
    clean: None, private_settings: Settings, private_app: Celery, client: Client, admin: redis.Redis
) -> None:
    home = private_settings.home
    with node(private_settings, private_app, "f") as one, node(private_settings, private_app, "g") as two:
        # Given a slow task started by one of two workers, whose result channel is watched
        handle, path = submit_naps(client, home, 1, 20.0, "parent")[0]
        wait_until(lambda: bool(runs(path)), "the task started")
        paused, live = (one, two) if runs(path)[0] in pool_pids(one) else (two, one)
        paused_node = f"{ROLE}@f" if paused is one else f"{ROLE}@g"
        listener = admin.pubsub(ignore_subscribe_messages=True)
        listener.subscribe(c.result_key(ROLE, handle.id))
        # When that worker is paused past XNAI_DEAD_AFTER until its peer has started the task again
        os.killpg(paused.pid, signal.SIGSTOP)
        wait_until(lambda: len(runs(path)) == 2, "the task started again on the peer")
        assert runs(path)[1] in pool_pids(live)
        # and, back, is told to revoke and terminate its stale run: its parent (not the pool process) stores REVOKED
        os.killpg(paused.pid, signal.SIGCONT)
        with client.signing():
            private_app.control.revoke([handle.id], terminate=True, destination=[paused_node])

        # Then the parent's result is refused by the paused worker's fence, in one line
        def parent_fenced() -> bool:
            events = log_events(private_settings, "result_fenced")
            return any(e.get("task_id") == handle.id and e["pid"] == paused.pid for e in events)

        wait_until(parent_fenced, "the paused worker's parent refused by its fence")
        # and the waiting client gets the live worker's result, the only final state ever published
        result = handle.get(timeout=WAIT_S)
        assert result["pid"] == runs(path)[1] and stored_result(admin, handle.id)["status"] == "SUCCESS"
        published, drained_at = [], time.monotonic() + 2
        while time.monotonic() < drained_at:  # everything published since it subscribed waits in its socket
            if (message := listener.get_message(timeout=0.2)) is not None:
                published.append(json.loads(message["data"])["status"])
        listener.close()
        assert [status for status in published if status in states.READY_STATES] == [states.SUCCESS]
        wait_until(lambda: not admin.hlen(c.unacked_key(ROLE)), "no unacked message")


def test_a_copy_of_a_task_finished_before_its_worker_was_declared_dead_does_not_run_again(
    clean: None, private_settings: Settings, private_app: Celery, client: Client, admin: redis.Redis
) -> None:
    # Given a message taken by no worker yet, a copy of it kept as its worker would hold it
    handle, path = submit_naps(client, private_settings.home, 1, 0.1, "done")[0]
    raw_item = admin.lindex(ROLE, -1)
    assert raw_item is not None
    with node(private_settings, private_app, "r") as live:
        # and a live worker that ran it to the end (result stored, nonce done)
        first = handle.get(timeout=WAIT_S)
        assert first["pid"] in pool_pids(live)
        # When a silent worker turns out to have held a copy it never acknowledged (it had finished it, then froze)
        ghost = f"{ROLE}@ghost#000001"
        fabricate_holder(admin, ghost, raw_item, beat_at=server_time(admin) - 60)

        # Then the live worker gives it back, and its gate refuses the copy as a replay: the task does not run again
        wait_until(lambda: any(e["instance"] == ghost for e in log_events(private_settings, "dead_worker_restored")),
                   "the ghost's message restored")  # fmt: skip
        wait_until(
            lambda: any(e.get("task_id") == handle.id for e in log_events(private_settings, "message_refused")),
            "the copy refused",
        )
        refusal = next(e for e in log_events(private_settings, "message_refused") if e.get("task_id") == handle.id)
        assert refusal["msg"] == f"refused message {handle.id} (replay): nonce already used by a finished task"
        assert runs(path) == [first["pid"]]
        assert stored_result(admin, handle.id)["result"] == first
        wait_until(lambda: not admin.hlen(c.unacked_key(ROLE)) and not admin.llen(ROLE), "nothing left taken")


def test_a_worker_whose_heartbeat_is_fresh_is_never_touched(
    clean: None, private_settings: Settings, private_app: Celery, client: Client, admin: redis.Redis
) -> None:
    # Given a message taken (popped and held) by a worker instance that keeps beating
    handle, path = submit_naps(client, private_settings.home, 1, 0.1, "fresh")[0]
    raw_item = admin.rpop(ROLE)
    assert raw_item is not None
    holder = f"{ROLE}@busy#000002"
    tag = fabricate_holder(admin, holder, raw_item, beat_at=server_time(admin))
    beating = threading.Event()
    beating.set()

    def beat() -> None:
        while beating.is_set():
            admin.zadd(c.alive_key(ROLE), {holder: server_time(admin)})
            time.sleep(0.5)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        with node(private_settings, private_app, "s") as live:
            # When a live peer checks for dead workers for three times XNAI_DEAD_AFTER
            deadline = time.monotonic() + 3 * DEAD_AFTER_S
            while time.monotonic() < deadline:
                # Then the message stays the holder's: still unacked and held, not back in the queue, not run
                assert admin.hexists(c.unacked_key(ROLE), tag)
                assert admin.sismember(c.held_key(ROLE, holder), tag)
                assert not admin.llen(ROLE) and not runs(path)
                time.sleep(0.5)
            assert not any(e["instance"] == holder for e in log_events(private_settings, "dead_worker_restored"))

            # When the holder stops beating, Then (the control) its message comes back and the peer runs it
            beating.clear()
            beater.join()
            assert handle.get(timeout=WAIT_S)["pid"] in pool_pids(live)
            assert len(runs(path)) == 1
    finally:
        beating.clear()


def test_a_live_workers_task_longer_than_the_visibility_timeout_runs_once_and_is_not_swept_back(
    clean: None, private_settings: Settings, private_app: Celery, client: Client, admin: redis.Redis
) -> None:
    # Given a worker whose visibility timeout is 10 s (its sweep for older messages runs every 10 s)
    short = {"XNAI_VISIBILITY_TIMEOUT": "10", "XNAI_TASK_TIME_LIMIT": "9"}
    with node(private_settings, private_app, "v", env=short) as live:
        # When it runs a task for 30 s (a time limit of its own), beating all along
        path = private_settings.home / "runs-visible"
        task_id = publish_nap(private_app, private_settings, 30.0, path, time_limit_s=60)
        wait_until(lambda: bool(runs(path)), "the task started")
        # Then its sweep never puts the message back: it stays taken, the queue empty, the task run once
        deadline = time.monotonic() + WAIT_S
        while not admin.exists(c.result_key(ROLE, task_id)):
            assert admin.hlen(c.unacked_key(ROLE)) == 1 and not admin.llen(ROLE)
            assert len(runs(path)) == 1
            assert time.monotonic() < deadline
            time.sleep(0.2)
        result = client.handle(task_id, ROLE, "nap").get(timeout=WAIT_S)
        assert runs(path) == [result["pid"]] and result["pid"] in pool_pids(live)
        # and its acknowledgement leaves nothing taken
        wait_until(lambda: not admin.hlen(c.unacked_key(ROLE)), "no unacked message")
        assert not admin.keys(c.held_pattern(ROLE)) and not admin.llen(ROLE)


def test_the_visibility_sweep_skips_a_live_holder_and_takes_a_restored_tag_out_of_every_held_set(
    clean: None, private_settings: Settings, client: Client, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two messages taken 60 s ago: one by an instance beating now, one by two silent ones (a stale held set)
    home = private_settings.home
    submit_naps(client, home, 2, 0.1, "swept")
    kept_raw, swept_raw = admin.rpop(ROLE), admin.rpop(ROLE)
    assert kept_raw is not None and swept_raw is not None
    holder, gone, stale = f"{ROLE}@live#0000d1", f"{ROLE}@gone#0000d2", f"{ROLE}@stale#0000d3"
    now = server_time(admin)
    kept = fabricate_holder(admin, holder, kept_raw, beat_at=now)
    swept = fabricate_holder(admin, gone, swept_raw, beat_at=now - 60)
    admin.sadd(c.held_key(ROLE, stale), swept)
    admin.zadd(c.alive_key(ROLE), {stale: now - 60})
    admin.zadd(c.unacked_index_key(ROLE), {kept: time.time() - 60, swept: time.time() - 60})
    swept_id = json.loads(swept_raw)["headers"]["id"]
    # and this process a role worker instance with a visibility timeout of 10 s (no heartbeat of its own running)
    sweeper = dead_workers.Instance(ROLE, f"{ROLE}@sweeper", "0000d4")
    monkeypatch.setattr(dead_workers._this, "instance", sweeper)
    beats = dead_workers.Heartbeat(sweeper, lambda: admin, dead_after_s=DEAD_AFTER_S, fence_ttl_s=60)
    monkeypatch.setattr(dead_workers._this, "heartbeat", beats)
    url = redis_urls.connection_url(private_settings, ROLE)
    options = celeryconfig.transport_options(private_settings, ROLE) | {"visibility_timeout": 10}
    with Connection(url, transport_options=options) as conn:
        conn.transport.Channel = KeepingChannel
        channel = conn.channel()
        # When kombu's visibility sweep runs
        channel.qos.restore_visible(num=10, interval=1)

    # Then the live holder's message is left where it is: taken, held, not queued
    assert admin.hexists(c.unacked_key(ROLE), kept) and admin.sismember(c.held_key(ROLE, holder), kept)
    # and the other is back in the queue, marked redelivered, in no held set, fenced from both silent holders
    queued = admin.lrange(ROLE, 0, -1)
    assert [json.loads(item)["headers"]["id"] for item in queued] == [swept_id]
    assert json.loads(queued[0])["headers"]["redelivered"] is True
    assert not admin.hexists(c.unacked_key(ROLE), swept)
    assert not admin.sismember(c.held_key(ROLE, gone), swept) and not admin.sismember(c.held_key(ROLE, stale), swept)
    assert admin.sismember(c.fenced_key(ROLE, gone), swept_id) and admin.sismember(c.fenced_key(ROLE, stale), swept_id)


def test_a_fenced_worker_settles_nothing_a_peer_took_back(
    clean: None, private_settings: Settings, private_stack: Stack, admin: redis.Redis, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # Given two instances of the role on one connection as the role's own Redis user (no worker consumes meanwhile)
    old = dead_workers.Instance(ROLE, f"{ROLE}@old", "0000aa")
    new = dead_workers.Instance(ROLE, f"{ROLE}@new", "0000bb")
    url = redis_urls.connection_url(private_settings, ROLE)
    options = celeryconfig.transport_options(private_settings, ROLE)
    role_conn = broker.connect(url)
    with Connection(url, transport_options=options) as conn, caplog.at_level(logging.INFO):
        conn.transport.Channel = KeepingChannel
        channel = conn.channel()
        task_id = "5c0ffee0-0000-4000-8000-000000000001"
        producer = conn.Producer(channel)
        queue = next(q for q in celeryconfig.task_queues() if q.name == ROLE)
        producer.publish({"n": 1}, exchange=ROLE, routing_key=ROLE, headers={"id": task_id}, declare=[queue])
        # and the old instance took the message
        monkeypatch.setattr(dead_workers._this, "instance", old)
        taken = channel.basic_get(ROLE)
        assert taken is not None and role_conn.sismember(old.held_key, taken.delivery_tag)

        # When a peer declares the old one dead (silent past XNAI_DEAD_AFTER) and gives its message back
        role_conn.zadd(c.alive_key(ROLE), {old.name: server_time(role_conn) - 60})
        done = dead_workers.restore_dead(role_conn, ROLE, old.name, dead_after_s=DEAD_AFTER_S, fence_ttl_s=60)
        assert done is not None and done.restored == 1 and role_conn.llen(ROLE) == 1
        # and the new instance takes it, under the same delivery tag
        monkeypatch.setattr(dead_workers._this, "instance", new)
        again = conn.channel().basic_get(ROLE)
        assert again is not None and again.delivery_tag == taken.delivery_tag
        assert again.delivery_info.get("redelivered") or again.headers.get("redelivered")

        # Then the old instance, back, neither pushes it a second time on reconnect nor acknowledges the new one's
        monkeypatch.setattr(dead_workers._this, "instance", old)
        left = give_back(conn, {taken.delivery_tag: task_id}, finished=lambda _: False)
        assert left == {} and role_conn.llen(ROLE) == 0
        assert "(0 already done, dropped; 1 given back by a peer already, left to it)" in caplog.text
        channel.qos.ack(taken.delivery_tag)
        assert role_conn.hexists(c.unacked_key(ROLE), taken.delivery_tag)
        assert "was given back by a peer while this worker was silent: left to it" in caplog.text
        # and the store script refuses its result of that task, while the new instance's is stored
        store = ResultStore(role_conn)
        key = c.result_key(ROLE, task_id)
        fenced = Riders(fence_key=old.fenced_key, task_id=task_id)
        assert store.outcome(key, json.dumps({"status": "SUCCESS", "task_id": task_id}), 60, fenced) is Outcome.FENCED
        assert role_conn.get(key) is None
        mine = Riders(fence_key=new.fenced_key, task_id=task_id)
        assert store.outcome(key, json.dumps({"status": "SUCCESS", "task_id": task_id}), 60, mine) is Outcome.STORED
        # and the new instance's acknowledgement settles it
        monkeypatch.setattr(dead_workers._this, "instance", new)
        again.ack()
        assert not role_conn.hexists(c.unacked_key(ROLE), taken.delivery_tag)
        assert not role_conn.exists(new.held_key) and not role_conn.exists(old.held_key)
        # and a second look at the old instance finds nothing to do: it is gone from the alive set
        assert dead_workers.restore_dead(role_conn, ROLE, old.name, dead_after_s=DEAD_AFTER_S, fence_ttl_s=60) is None
    role_conn.close()


def test_a_role_reaches_only_its_own_heartbeats_held_sets_and_fences(
    private_settings: Settings, private_stack: Stack
) -> None:
    # Given the curation role's own Redis user
    conn = broker.connect(redis_urls.connection_url(private_settings, ROLE))
    try:
        # When it writes its own role's keys, Then it may
        conn.zadd(c.alive_key(ROLE), {"x": 1})
        conn.sadd(c.held_key(ROLE, "x"), "t")
        conn.sadd(c.fenced_key(ROLE, "x"), "t")
        conn.delete(c.alive_key(ROLE), c.held_key(ROLE, "x"), c.fenced_key(ROLE, "x"))
        # When it touches another role's, Then each is refused
        writes: list[Callable[[], Any]] = [
            lambda: conn.zadd(c.alive_key("grok"), {"x": 1}),
            lambda: conn.smembers(c.held_key("grok", "x")),
            lambda: conn.sadd(c.fenced_key("cline", "x"), "t"),
        ]
        for write in writes:
            with pytest.raises(redis.exceptions.NoPermissionError):
                write()
    finally:
        conn.close()


def test_dead_after_below_five_seconds_is_refused(tmp_path: Path) -> None:
    # When XNAI_DEAD_AFTER is below its floor, Then one line names it
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"XNAI_HOME": str(tmp_path), "XNAI_DEAD_AFTER": "4"})
    assert str(err.value) == "XNAI_DEAD_AFTER=4 is out of range (5 to 86400)"
    # and the default is 30 s
    assert Settings.from_env({"XNAI_HOME": str(tmp_path)}).dead_after == 30


def test_a_restored_message_goes_back_marked_redelivered_to_its_priority_list() -> None:
    # Given kombu's unacked entry of a message of priority 7
    message = {"body": "e30=", "headers": {"id": "t1", "task": "curation.nap"}, "properties": {"priority": 7}}
    raw = json.dumps([message, ROLE, ROLE])
    # When it is prepared for the queue, Then it goes to the list kombu picks for 7 (its step 6), marked redelivered
    queue_list, item, task_id = dead_workers.restored_item(ROLE, raw) or ("", "", "")
    assert queue_list == c.queue_keys(ROLE)[c.KOMBU_PRIORITY_STEPS.index(6)] and task_id == "t1"
    restored = json.loads(item)
    assert restored["headers"]["redelivered"] is True
    assert restored["properties"]["delivery_info"]["redelivered"] is True
    # and an entry that is not kombu's is not restored
    assert dead_workers.restored_item(ROLE, b"not json") is None


def test_a_heartbeat_that_cannot_reach_redis_says_so_once_and_beats_again(
    clean: None, private_settings: Settings, private_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a heartbeat whose first two connections fail, then reach Redis as the role's user
    instance = dead_workers.Instance(ROLE, f"{ROLE}@h", "0000cc")
    url = redis_urls.connection_url(private_settings, ROLE)
    tries: list[int] = []

    def connect() -> redis.Redis:
        tries.append(1)
        if len(tries) <= 2:
            raise redis.exceptions.ConnectionError("Connection refused")
        return broker.connect(url)

    heartbeat = dead_workers.Heartbeat(instance, connect, dead_after_s=DEAD_AFTER_S, fence_ttl_s=60)
    with caplog.at_level(logging.DEBUG, logger=dead_workers.__name__):
        # When it ticks during the outage, Then nothing is raised and one WARNING line says why
        heartbeat.tick()
        heartbeat.tick()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [f"heartbeat of {instance.name} failed, tried again every 1 s: Connection refused"]
        # When Redis answers again, Then it beats: the instance is registered on Redis' clock
        heartbeat.tick()
    conn = broker.connect(url)
    try:
        assert conn.zscore(c.alive_key(ROLE), instance.name) is not None
    finally:
        conn.close()
    heartbeat.stop()


def test_the_heartbeat_waits_for_a_reply_a_third_of_dead_after_at_most(
    clean: None, private_settings: Settings, private_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the heartbeat of a worker declared dead after 6 s
    monkeypatch.setattr(dead_workers, "_this", dead_workers._This())
    instance = dead_workers.Instance(ROLE, f"{ROLE}@t", "0000ee")
    url = redis_urls.connection_url(private_settings, ROLE)
    heartbeat = dead_workers.start_heartbeat(instance, url, dead_after_s=6, max_message_age_s=60)
    try:
        # When it talks to Redis, Then one slow reply (and its one retry) cannot outlast XNAI_DEAD_AFTER
        connection = heartbeat._redis().connection_pool.connection_kwargs
        assert connection["socket_timeout"] == 2.0 and connection["retry"].get_retries() == 1
    finally:
        heartbeat.stop()
    # and with a long XNAI_DEAD_AFTER it waits 5 s at most
    assert dead_workers.reply_timeout_s(30) == 5.0 and dead_workers.reply_timeout_s(5) == pytest.approx(5 / 3)
