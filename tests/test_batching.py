"""Dynamic batching of the curation encoder (XNAI_BATCH=on) on a real worker with the real encoder and ACLs."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from celery import states

from xnai_tasks.batching.batcher import EncoderBatcher
from xnai_tasks.client.sync import Client, TaskHandle
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.errors import RefusedError, SettingsError, TaskFailedError
from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.resilience.taking import TAKE_SCRIPT, TAKE_SHA
from xnai_tasks.security import redis_urls
from xnai_tasks.security.envelope import MAX_ENVELOPE_BYTES
from xnai_tasks.settings import Settings
from xnai_tasks.worker.argv import worker_argv

from support import admin_connection, log_events, publish_raw, run_xnai, running_stack, short_home

TEXTS = [f"Note {i}: the {word} service restarted after a memory alert." for i, word in enumerate("abcdefghijklmnop")]
#: A lone surrogate: valid JSON and a non-empty string, but the tokenizer cannot read it.
UNREADABLE = "broken \ud800 text"
#: The Stack's name for the curation worker process.
WORKER = "curation"


# ---------------------------------------------------------------- the batcher alone (pure logic, a fake encoder)


def _fake_encode(calls: list[list[str]]) -> Any:
    def encode(texts: list[str]) -> list[list[float]]:
        calls.append(texts)
        if any("bad" in text for text in texts):
            raise TypeError("unreadable text")
        return [[float(len(text))] for text in texts]

    return encode


def test_requests_waiting_together_share_one_call_and_a_failure_stays_with_its_request() -> None:
    # Given a batcher whose encoder fails on any batch holding "bad", and 5 threads announced as coming
    calls: list[list[str]] = []
    batcher = EncoderBatcher(_fake_encode(calls), max_size=8, max_wait_s=5.0)
    answers: dict[str, Any] = {}
    ready = threading.Barrier(5)

    def task(text: str) -> None:
        with batcher.expecting():
            ready.wait()
            try:
                answers[text] = batcher.encode([text])
            except TypeError as exc:
                answers[text] = exc

    # When they submit "a", "bb", "bad", "cccc", "ddddd"
    threads = [threading.Thread(target=task, args=(t,)) for t in ("a", "bb", "bad", "cccc", "ddddd")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    batcher.close()
    # Then the first call carried all five (it waited for every announced thread), failed, and each ran alone
    assert sorted(calls[0]) == ["a", "bad", "bb", "cccc", "ddddd"]
    assert len(calls) == 6
    # and only "bad" failed; every other request has its own vector
    assert isinstance(answers["bad"], TypeError)
    for text in ("a", "bb", "cccc", "ddddd"):
        assert answers[text].vectors == [[float(len(text))]]


@pytest.mark.parametrize(
    ("name", "value"), [("XNAI_BATCH", "maybe"), ("XNAI_BATCH_MAX_SIZE", "0"), ("XNAI_BATCH_MAX_WAIT_MS", "-1")]
)
def test_a_bad_batching_setting_is_refused_naming_it(tmp_path: Path, name: str, value: str) -> None:
    # Given a bad batching variable, When settings are read, Then one error names it
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({"XNAI_HOME": str(tmp_path), name: value})


def test_only_a_batching_curation_worker_runs_task_threads(tmp_path: Path) -> None:
    # Given batching on (32 texts a batch)
    on = Settings(home=tmp_path, batch=True, batch_max_size=32)
    # Then curation's worker runs the thread pool with 64 task threads, and another role's stays prefork
    assert {"--pool=threads", "--concurrency=64"} <= set(worker_argv(on, "curation", concurrency=1, beat=False))
    assert "--pool=prefork" in worker_argv(on, "grok", concurrency=1, beat=False)
    assert "--pool=prefork" in worker_argv(Settings(home=tmp_path), "curation", concurrency=1, beat=False)


# ---------------------------------------------------------------- taking a message (resilience/taking.py)


def _envelope(tag: str, body: str = "W10=") -> str:
    """A queue item shaped as kombu's envelope (``stamps`` an empty list: JSON that Lua's cjson would re-encode)."""
    properties = {"delivery_tag": tag, "body_encoding": "base64", "priority": 0}
    properties["delivery_info"] = {"exchange": "curation", "routing_key": "curation"}
    envelope = {"body": body, "content-type": "application/json", "headers": {"id": tag, "stamps": []}}
    return json.dumps({**envelope, "content-encoding": "utf-8", "properties": properties})


def test_a_message_is_taken_and_recorded_as_held_in_one_step(redis_server: EmbeddedRedis) -> None:
    # Given curation's queue holding two messages (pushed oldest first, as producers LPUSH) and a non-envelope
    conn = redis_server.client()
    lists = c.queue_keys("curation")
    unacked, index = c.unacked_key("curation"), c.unacked_index_key("curation")
    held = c.held_key("curation", "curation@test#000001")
    conn.lpush(lists[0], _envelope("first"), _envelope("second"), "not an envelope")
    take = conn.register_script(TAKE_SCRIPT)

    def taken() -> Any:
        return take(keys=[*lists, unacked, index, held], args=[len(lists), 1000.0, MAX_ENVELOPE_BYTES])

    # When the script takes one
    first = taken()
    # Then it is the oldest, and in the same step it is in the unacked hash (kombu's [message, exchange, routing
    # key] around the item byte for byte: the signature covers it as sent), in its index and in the held set
    assert first == [lists[0].encode(), _envelope("first").encode(), b"first"]
    assert conn.hget(unacked, "first") == f'[{_envelope("first")}, "curation", "curation"]'.encode()
    assert json.loads(conn.hget(unacked, "first"))[0] == json.loads(_envelope("first"))
    assert conn.zscore(index, "first") == 1000.0
    assert conn.smembers(held) == {b"first"}
    assert conn.lrange(lists[0], 0, -1) == [b"not an envelope", _envelope("second").encode()]
    # When it takes twice more, Then the next message is recorded, and the non-envelope is taken unrecorded
    assert taken()[2] == b"second"
    assert taken() == [lists[0].encode(), b"not an envelope"]
    assert conn.hlen(unacked) == 2 and conn.smembers(held) == {b"first", b"second"}
    # and an empty queue gives nothing
    assert taken() is None
    conn.close()


# ---------------------------------------------------------------- a real batching curation worker


@pytest.fixture(scope="module")
def settings() -> Settings:
    # no response cache: every task reaches the encoder
    # a killed worker's messages come back after 5 s of silence (XNAI_DEAD_AFTER's least), given back by its
    # restarted successor (resilience/dead_workers.py), not after the visibility timeout
    return Settings(
        home=short_home(),
        model_mode="lazy",
        cache=False,
        batch=True,
        batch_max_size=8,
        batch_max_wait_ms=20,
        visibility_timeout=30,
        task_time_limit=20,
        dead_after=5,
    )


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings, ("curation",)) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Stack, settings: Settings) -> Iterator[Client]:
    made = Client(settings)
    # the encoder loads on the first task (lazy), not inside the measured bursts
    made.submit("curation", "embed", texts=["warm up"]).get(timeout=120)
    yield made
    made.close()


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_concurrent_one_text_tasks_are_each_answered_from_fewer_encoder_calls(client: Client) -> None:
    # Given the reference vectors of 16 texts (one multi-text task)
    reference = client.submit("curation", "embed", texts=TEXTS).get(timeout=120)["vectors"]
    # When 16 one-text embed tasks, 2 searches and 2 classifications are submitted at once
    embeds = [client.submit("curation", "embed", texts=[text]) for text in TEXTS]
    searches = [client.submit("curation", "search", query=text, k=1) for text in TEXTS[:2]]
    classes = [client.submit("curation", "classify", text=t, labels=["sport", "servers"]) for t in TEXTS[:2]]
    results = [handle.get(timeout=120) for handle in embeds + searches + classes]  # each verified (signed)
    # Then each embed task got the vector of its own text
    for text, expected, result in zip(TEXTS, reference, results, strict=False):
        assert result["count"] == 1
        assert _cosine(result["vectors"][0], expected) > 0.999, text
        assert max(_cosine(result["vectors"][0], other) for other in reference if other is not expected) < 0.999
    assert all(result["label"] == "servers" for result in results[-2:])
    # and the 20 tasks ran in fewer encoder calls than tasks, some carrying several tasks
    calls = {(result["pid"], result["batch"]["call"]) for result in results}
    assert all(result["batch"]["call"] > 0 for result in results)
    assert len(calls) < len(results)
    assert max(result["batch"]["tasks"] for result in results) > 1


def test_an_unreadable_text_fails_only_its_own_task(client: Client) -> None:
    # Given a burst of one-text tasks with one text the tokenizer cannot read in the middle
    texts = [*TEXTS[:6], UNREADABLE, *TEXTS[6:12]]
    # When they are submitted at once
    handles = [client.submit("curation", "embed", texts=[text]) for text in texts]
    # Then that task fails, naming why, and every other one has its vector
    outcomes: list[Any] = []
    for handle in handles:
        try:
            outcomes.append(handle.get(timeout=120))
        except TaskFailedError as exc:
            outcomes.append(exc)
    failed = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, TaskFailedError)]
    assert failed == [6]
    assert "could not read the text" in str(outcomes[6])
    assert all(outcome["count"] == 1 for i, outcome in enumerate(outcomes) if i != 6)


def test_a_batching_worker_still_refuses_an_unsigned_message_unrun(client: Client, settings: Settings) -> None:
    # Given an unsigned one-text embed message put straight on curation's queue
    app = create_app(settings, main="xnai_test_batching_raw")
    try:
        task_id, _, _ = publish_raw(app, task="curation.embed", queue="curation", kwargs={"texts": ["injected"]})
    finally:
        app.close()
    # Then the gate in front of the thread pool refuses it (unsigned): its result is the refusal, not vectors
    with pytest.raises(RefusedError, match=r"refused \(unsigned\)"):
        client.handle(task_id, "curation", "embed").get(timeout=60)


def test_batching_runs_under_the_roles_acls(client: Client, settings: Settings) -> None:
    # Given the stack's embedded Redis, which runs with a user per role
    url = redis_urls.connection_url(settings, "curation")
    conn = broker.connect(url, timeout=5.0)
    try:
        # Then the curation credential the worker uses may not read grok's queue
        with pytest.raises(redis.exceptions.NoPermissionError):
            conn.llen(c.queue_keys("grok")[0])
    finally:
        conn.close()
    # and a batched task still answers through it, signed by curation's key (the client verifies it)
    assert client.submit("curation", "search", query="memory alert", k=1).get(timeout=60)["batch"]["call"] > 0


def test_an_envelope_refused_at_the_door_is_held_by_no_worker(stack: Stack, settings: Settings) -> None:
    # Given an item shaped as an envelope (the take script records it) whose body is not base64, in curation's
    # queue through curation's own credential
    conn = broker.connect(redis_urls.connection_url(settings, "curation"), timeout=5.0)
    conn.lpush("curation", _envelope("door-refused", body="!!!not base64!!!"))
    conn.close()
    # When the batching worker takes it, Then it is refused as malformed, kept with its reason, and held by no
    # worker: no unacked entry and in no held set (nothing would ever acknowledge it)
    with admin_connection(settings) as admin:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            entries = [json.loads(raw) for raw in admin.lrange(c.dead_letter_key("curation"), 0, 50)]
            refused = [e for e in entries if e["id"] == "door-refused"]
            holders = [
                k for k in admin.scan_iter(match=c.held_pattern("curation")) if admin.sismember(k, "door-refused")
            ]
            if refused and not admin.hexists(c.unacked_key("curation"), "door-refused") and not holders:
                break
            time.sleep(0.05)
        assert [(e["reason"], "not base64" in e["detail"]) for e in refused] == [("malformed", True)]
        assert not admin.hexists(c.unacked_key("curation"), "door-refused")
        assert holders == []


def test_a_worker_takes_on_after_redis_forgets_its_take_script(client: Client, settings: Settings) -> None:
    # Given Redis's script cache emptied, as a restarted Redis has it
    with admin_connection(settings) as admin:
        admin.script_flush()
    # When a task is sent, Then the worker loads its take script again (it takes with it) and the task is answered
    assert client.submit("curation", "embed", texts=["after a script flush"]).get(timeout=60)["count"] == 1
    with admin_connection(settings) as admin:
        assert admin.script_exists(TAKE_SHA) == [True]


def _burst_held_by_the_worker(client: Client, settings: Settings, texts: list[str]) -> list[TaskHandle]:
    """Submit one-text tasks until the worker is seen holding some unacknowledged (a burst may all end first)."""
    conn = broker.connect(redis_urls.connection_url(settings, "curation"), timeout=5.0)
    try:
        for _ in range(5):
            handles = [client.submit("curation", "embed", texts=[text]) for text in texts]
            while not all(handle.state in states.READY_STATES for handle in handles):
                if conn.hlen(c.unacked_key("curation")):
                    return handles
                time.sleep(0.002)
    finally:
        conn.close()
    pytest.fail("the worker was never seen holding a message")


@pytest.mark.slow
def test_a_killed_batching_worker_loses_no_task(stack: Stack, client: Client, settings: Settings) -> None:
    # Given a burst of one-text tasks the batching worker holds (prefetched, unacknowledged until each is done)
    # and keeps taking (64 task threads: while its queue holds messages, it takes one after the other, so a kill
    # often lands while it is taking one: with kombu's BRPOP-then-record that message was lost, resilience/taking.py)
    texts = [f"Killed worker note {i}: the queue keeps every message until it is acknowledged." for i in range(24)]
    handles = _burst_held_by_the_worker(client, settings, texts)
    # When the worker process is killed outright while it holds them
    os.kill(stack.children[WORKER].pid, signal.SIGKILL)
    stack.children[WORKER].wait(10)
    # Then each of its messages is where Redis keeps it: still queued, held (unacked), or answered
    with admin_connection(settings) as admin:
        kept = {
            json.loads(raw)["headers"]["id"] for key in c.queue_keys("curation") for raw in admin.lrange(key, 0, -1)
        }
        kept |= {json.loads(raw)[0]["headers"]["id"] for raw in admin.hvals(c.unacked_key("curation"))}
    assert [h.id for h in handles if h.id not in kept and h.state not in states.READY_STATES] == []
    # When the stack starts it again (a new instance, which gives back its predecessor's after XNAI_DEAD_AFTER)
    deadline = time.monotonic() + 60
    while stack.children[WORKER].poll() is not None and time.monotonic() < deadline:
        stack.restart_exited(lambda _: None)
        time.sleep(0.2)
    # Then every task is answered with its own vector (a verified result): the held messages came back
    reference = client.submit("curation", "embed", texts=texts).get(timeout=120)["vectors"]
    for handle, expected in zip(handles, reference, strict=True):
        assert _cosine(handle.get(timeout=120)["vectors"][0], expected) > 0.999


def _encoder_processes(worker_pid: int) -> list[psutil.Process]:
    return [
        proc
        for proc in psutil.Process(worker_pid).children(recursive=True)
        if "xnai_tasks.batching.encoder_process" in " ".join(proc.cmdline())
    ]


def test_a_killed_encoder_process_is_said_and_replaced_and_the_worker_goes_on(
    stack: Stack, client: Client, settings: Settings
) -> None:
    # Given the batching worker's encoder process, answering
    assert client.submit("curation", "embed", texts=["before the kill"]).get(timeout=120)["count"] == 1
    worker = stack.children[WORKER].pid
    [encoder] = _encoder_processes(worker)
    # (the health task names it)
    health = client.submit("curation", "health").get(timeout=60)
    [model] = [m for m in health["models"] if m["kind"] == "encoder"]
    assert model["encoder_process"]["pid"] == encoder.pid
    # When it is killed outright
    encoder.kill()
    # and gone but for its exit status (a zombie with no thread left: the worker reaps it on its next call)
    deadline = time.monotonic() + 10
    while not (encoder.status() == psutil.STATUS_ZOMBIE and encoder.num_threads() <= 1):
        assert time.monotonic() < deadline, "the killed encoder process did not end"
        time.sleep(0.05)
    # Then the worker answers the next tasks (a new encoder process), each with its own vector
    texts = [f"After the encoder died, note {i}." for i in range(6)]
    handles = [client.submit("curation", "embed", texts=[text]) for text in texts]
    vectors = [handle.get(timeout=120)["vectors"][0] for handle in handles]
    reference = client.submit("curation", "embed", texts=texts).get(timeout=120)["vectors"]
    assert all(_cosine(a, b) > 0.999 for a, b in zip(vectors, reference, strict=True))
    assert stack.children[WORKER].pid == worker and stack.children[WORKER].poll() is None
    assert [p.pid for p in _encoder_processes(worker)] not in ([], [encoder.pid])
    # And the death was logged in one line naming the signal
    died = log_events(settings, "encoder_process_died")
    assert any(e["exit"] == "signal SIGKILL" and "curation encoder process ended" in e["msg"] for e in died)
    # And xnai status lists it among the role's worker deaths
    shown = run_xnai(["status"], settings)
    assert "encoder process signal SIGKILL 1" in shown.stdout, shown.stdout
