"""Dynamic batching of the curation encoder (XNAI_BATCH=on) on a real worker with the real encoder and ACLs."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import states

from xnai_tasks.batching.batcher import EncoderBatcher
from xnai_tasks.client.sync import Client, TaskHandle
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.errors import RefusedError, SettingsError, TaskFailedError
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security import redis_urls
from xnai_tasks.settings import Settings
from xnai_tasks.worker.argv import worker_argv

from support import publish_raw, running_stack, short_home

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


# ---------------------------------------------------------------- a real batching curation worker


@pytest.fixture(scope="module")
def settings() -> Settings:
    # no response cache: every task reaches the encoder
    # a short visibility timeout: the messages a killed worker held come back within seconds
    return Settings(
        home=short_home(),
        model_mode="lazy",
        cache=False,
        batch=True,
        batch_max_size=8,
        batch_max_wait_ms=20,
        visibility_timeout=30,
        task_time_limit=20,
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
@pytest.mark.xfail(
    strict=False,
    reason="known gap, batching worker only (XNAI_BATCH, off by default): after a SIGKILL of the thread-pool worker "
    "one held message stayed unanswered for over 2 min in about 1 of 3 runs on a loaded 2-core machine; cause not "
    "found yet (kombu's BRPOP-then-HSET window, or the thread pool's restore path); the prefork case is "
    "test_worker_lost's and holds",
)
def test_a_killed_batching_worker_loses_no_task(stack: Stack, client: Client, settings: Settings) -> None:
    # Given a burst of one-text tasks the batching worker holds (prefetched, unacknowledged until each is done)
    texts = [f"Killed worker note {i}: the queue keeps every message until it is acknowledged." for i in range(24)]
    handles = _burst_held_by_the_worker(client, settings, texts)
    # When the worker process is killed outright while it holds them, and the stack starts it again
    os.kill(stack.children[WORKER].pid, signal.SIGKILL)
    stack.children[WORKER].wait(10)
    deadline = time.monotonic() + 60
    while stack.children[WORKER].poll() is not None and time.monotonic() < deadline:
        stack.restart_exited(lambda _: None)
        time.sleep(0.2)
    # Then every task is answered with its own vector (a verified result): the held messages came back
    reference = client.submit("curation", "embed", texts=texts).get(timeout=120)["vectors"]
    for handle, expected in zip(handles, reference, strict=True):
        assert _cosine(handle.get(timeout=120)["vectors"][0], expected) > 0.999
