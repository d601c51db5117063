"""The result store script (xnai_tasks/security/result_store.py) on a real Redis: Celery's "keep a stored success",
the write, the publish, the nonce marked done and the end counted, all in one command."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support import short_home
from xnai_tasks.core import broker
from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.security.ledger import NONCE_DONE, NONCE_SEEN
from xnai_tasks.security.result_store import ResultStore, Riders
from xnai_tasks.settings import Settings

RESULT = "celery-task-meta-test-one"
NONCE = "xnai:nonce:copilot:" + "a" * 32
BUCKET = "xnai:rate:copilot:1"


@pytest.fixture(scope="module")
def conn() -> Iterator[redis.Redis]:
    home = short_home()
    try:
        with EmbeddedRedis(Settings(home=home)) as server:
            yield broker.connect(server.url)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def store(conn: redis.Redis) -> ResultStore:
    conn.flushall()
    return ResultStore(conn)


def _meta(status: str) -> str:
    return json.dumps({"status": status, "result": 1, "task_id": "one"})


def _next_message(listener: Any) -> Any:
    """The next published message (the subscription's confirmation is skipped, as an empty read)."""
    for _ in range(10):
        message = listener.get_message(timeout=1.0)
        if message is not None:
            return message
    raise AssertionError("nothing was published")


def _status(message: Any) -> str:
    return str(json.loads(message["data"])["status"])


class CountingRedis(redis.Redis):  # type: ignore[misc]
    """A real client on the same connection pool that counts the commands it sends."""

    sent = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent += 1
        return super().execute_command(*args, **options)


@pytest.mark.usefixtures("store")  # an empty Redis
def test_a_final_result_is_stored_published_and_finished_in_one_command(conn: redis.Redis) -> None:
    # Given a nonce admitted by the gate, and a reader subscribed to the result's channel
    conn.set(NONCE, NONCE_SEEN, ex=500)
    listener = conn.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(RESULT)
    counting = CountingRedis(connection_pool=conn.connection_pool)
    counted = ResultStore(counting)
    counted.store(RESULT, _meta("STARTED"), 60, Riders())  # loads the script: not what is counted below
    assert _status(_next_message(listener)) == "STARTED"
    counting.sent = 0
    # When the final result is stored with its nonce and its throughput bucket
    stored = counted.store(RESULT, _meta("SUCCESS"), 60, Riders(nonce_key=NONCE, count_key=BUCKET, count_ttl_s=80))
    # Then it is stored with its expiry and published, the nonce is done with its time to live kept,
    # the end is counted, and the client sent one command for it all
    assert stored and counting.sent == 1
    assert json.loads(conn.get(RESULT) or b"{}")["status"] == "SUCCESS"
    assert 0 < conn.ttl(RESULT) <= 60
    assert _status(_next_message(listener)) == "SUCCESS"
    assert conn.get(NONCE) == NONCE_DONE and conn.ttl(NONCE) > 60
    assert conn.get(BUCKET) == b"1" and 0 < conn.ttl(BUCKET) <= 80
    listener.close()


def test_a_stored_success_is_never_overwritten(conn: redis.Redis, store: ResultStore) -> None:
    # Given a task whose success is stored, and its nonce still admitted
    conn.set(RESULT, _meta("SUCCESS"))
    conn.set(NONCE, NONCE_SEEN, ex=500)
    # When a later state of the same task id is stored (a copy run again: STARTED, then a FAILURE)
    started = store.store(RESULT, _meta("STARTED"), 60, Riders())
    failed = store.store(RESULT, _meta("FAILURE"), 60, Riders(nonce_key=NONCE))
    # Then the success stays, and the task's nonce is still finished
    assert not started and not failed
    assert json.loads(conn.get(RESULT) or b"{}")["status"] == "SUCCESS"
    assert conn.get(NONCE) == NONCE_DONE


def test_a_state_before_the_end_finishes_nothing(conn: redis.Redis, store: ResultStore) -> None:
    # Given a stored non-final state and no nonce key at all (it expired)
    conn.set(RESULT, "not json")
    # When a state is stored without riders, and another with a nonce that is gone
    assert store.store(RESULT, _meta("STARTED"), None, Riders())
    assert store.store(RESULT, _meta("RETRY"), 0, Riders(nonce_key=NONCE))
    # Then what was stored is overwritten and kept without expiry, and no nonce is created
    assert json.loads(conn.get(RESULT) or b"{}")["status"] == "RETRY"
    assert conn.ttl(RESULT) == -1
    assert conn.get(NONCE) is None
