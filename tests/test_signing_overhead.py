"""What the signed round trip does once instead of twice (xnai bench roundtrip): the gate verifies a message once,
as it is taken, and claims its nonce in the round trip that records it as unacked; a channel makes its Redis
client once; a client checks the signature of a published state it has a use for; telemetry writes the same line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import states
from kombu.message import Message

from tests.support import short_home
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.core.channel_client import ReusedClientChannel
from xnai_tasks.errors import MessageRejected
from xnai_tasks.observability.telemetry import Record
from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.security import gate as gate_module
from xnai_tasks.security.gate import MessageGate
from xnai_tasks.security.key_admin import init_keys
from xnai_tasks.security.keyring import Keyring, load_signer
from xnai_tasks.security.ledger import NONCE_SEEN
from xnai_tasks.security.message_signature import sign_message
from xnai_tasks.security.refusal import Reason
from xnai_tasks.security.signature import SIG_HEADER
from xnai_tasks.settings import Settings


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Settings, str]]:
    """Keys and a private Redis: (settings, its URL)."""
    home = short_home()
    init_keys(home)
    try:
        with EmbeddedRedis(Settings(home=home)) as server:
            yield Settings(home=home), server.url
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def gate(stack: tuple[Settings, str]) -> MessageGate:
    settings, url = stack
    return MessageGate(settings, frozenset({"cline"}), Keyring.load(settings.home), url)


@pytest.fixture
def conn(stack: tuple[Settings, str]) -> redis.Redis:
    return broker.connect(stack[1])


def _message(home: Path, *, tamper: bool = False) -> Message:
    """A signed ``cline.echo`` message as the worker's channel builds it from a queue item."""
    task_id = str(uuid.uuid4())
    headers: dict[str, Any] = {"lang": "py", "task": "cline.echo", "id": task_id, "root_id": task_id, "retries": 0}
    body = [[], {"value": 1}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    headers[SIG_HEADER] = sign_message(load_signer(home, "copilot"), headers=headers, body=body, queue="cline")
    if tamper:
        body[1] = {"value": 2}
    return Message(
        body=json.dumps(body),
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        delivery_info={"exchange": "cline", "routing_key": "cline"},
        accept=["application/json"],
    )


def _copy(message: Message) -> Message:
    """Another delivery of the same queue item (a replay)."""
    return Message(
        body=message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=dict(message.headers),
        delivery_info=dict(message.delivery_info),
        accept=["application/json"],
    )


def _record_and_claim(conn: redis.Redis, verdict: gate_module.Verdict) -> None:
    """What the worker's QoS does as it records a taken message as unacked: the claim rides in that pipeline."""
    pipe = conn.pipeline()
    pipe.zadd("unacked_index:test", {"tag": 1.0})
    if verdict.queue_claim(pipe):
        verdict.claimed(pipe.execute())
    else:
        pipe.execute()


def _counting_verifies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = gate_module.verify_message

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gate_module, "verify_message", counted)
    return calls


def test_a_taken_message_is_verified_once_and_its_nonce_claimed_with_its_record(
    gate: MessageGate, conn: redis.Redis, stack: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a signed message the gate takes as the channel records it
    verifies = _counting_verifies(monkeypatch)
    message = _message(stack[0].home)
    verdict = gate.take(message)
    # When its record's pipeline runs, then the gate checks it
    _record_and_claim(conn, verdict)
    verified = gate.check(message)
    # Then its signature was verified once, and its nonce claimed by that pipeline
    assert verified.task == "cline.echo"
    assert len(verifies) == 1
    assert conn.get(c.nonce_key("cline", verified.nonce)) == NONCE_SEEN


def test_a_copy_taken_later_is_a_replay_judged_from_the_pipeline(
    gate: MessageGate, conn: redis.Redis, stack: tuple[Settings, str]
) -> None:
    # Given a message admitted already
    message = _message(stack[0].home)
    _record_and_claim(conn, gate.take(message))
    gate.check(message)
    # When a copy of it is taken and recorded
    replay = _copy(message)
    _record_and_claim(conn, gate.take(replay))
    # Then the gate refuses it as a replay, as a claim of its own would
    with pytest.raises(MessageRejected) as refused:
        gate.check(replay)
    assert refused.value.reason == Reason.REPLAY
    assert refused.value.detail == "nonce already in flight"


def test_a_refusal_found_when_taken_claims_nothing(
    gate: MessageGate, conn: redis.Redis, stack: tuple[Settings, str]
) -> None:
    # Given a message whose body was changed after it was signed
    message = _message(stack[0].home, tamper=True)
    verdict = gate.take(message)
    # When it is recorded and checked
    _record_and_claim(conn, verdict)
    # Then it is refused for its signature, and its nonce was never claimed
    with pytest.raises(MessageRejected) as refused:
        gate.check(message)
    assert refused.value.reason == Reason.BAD_SIGNATURE
    nonce = message.headers[SIG_HEADER]["nonce"]
    assert conn.exists(c.nonce_key("cline", nonce)) == 0


def test_a_message_not_taken_is_verified_and_claimed_by_the_gate(
    gate: MessageGate, conn: redis.Redis, stack: tuple[Settings, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a message the gate did not take (another one was taken last)
    verifies = _counting_verifies(monkeypatch)
    gate.take(_message(stack[0].home))
    message = _message(stack[0].home)
    # When the gate checks it
    verified = gate.check(message)
    # Then it verified it itself and claimed its nonce
    assert len(verifies) == 2
    assert conn.get(c.nonce_key("cline", verified.nonce)) == NONCE_SEEN


class _Pool:
    pass


class _KombuChannel:
    """Stands for kombu's Redis channel: a new client for every call."""

    made = 0

    def __init__(self) -> None:
        self.pool = _Pool()

    def _create_client(self, asynchronous: bool = False) -> Any:
        type(self).made += 1
        return redis.Redis(connection_pool=redis.ConnectionPool()) if asynchronous else _Client(self.pool)


class _Client:
    def __init__(self, pool: _Pool) -> None:
        self.connection_pool = pool


class _Channel(ReusedClientChannel, _KombuChannel):
    pass


def test_a_channel_makes_one_client_per_pool() -> None:
    # Given a channel
    channel = _Channel()
    # When it sends three commands, then loses its pool (a lost connection) and sends one more
    first = [channel._create_client() for _ in range(3)]
    channel.pool = _Pool()
    after = channel._create_client()
    # Then one client served the first pool, and a new one the new pool
    assert first[0] is first[1] is first[2]
    assert after is not first[0] and after.connection_pool is channel.pool
    assert channel.made == 2


def test_a_state_before_the_end_is_checked_only_when_listened_for(stack: tuple[Settings, str]) -> None:
    from xnai_tasks.core.celery_app import create_app

    # Given a client's backend and a STARTED state signed by nobody (anyone on the result channel could send it)
    app = create_app(stack[0], main="xnai_overhead_test")
    backend = app.backend
    forged = json.dumps({"status": states.STARTED, "result": {"pid": 1}, "task_id": "t", SIG_HEADER: None})
    # When it is read by a waiter that has no use for it, and by one that listens for states
    unused = backend.decode_authentic(forged, interim=False)
    listened = backend.decode_authentic(forged)
    # Then neither takes it for a state of the task
    assert unused["status"] == states.PENDING
    assert listened["status"] == states.PENDING
    # and a final state is checked either way
    final = json.dumps({"status": states.SUCCESS, "result": 1, "task_id": "t", SIG_HEADER: None})
    assert backend.decode_authentic(final, interim=False)["status"] == states.PENDING
    app.close()


def test_a_telemetry_line_is_the_record_s_fields() -> None:
    # Given a record
    record = Record(
        task_id="t", role="cline", task="cline.echo", outcome="success", queue_wait_s=0.5, run_s=0.25,
        tokens=None, cache=None, model=None, pid=7, ts=1_700_000_000.0,
    )  # fmt: skip
    # When it is written as a line
    line = record.to_line()
    # Then the line is its fields as JSON, read back as the same record
    assert json.loads(line) == dataclasses.asdict(record)
    assert Record.from_json(json.loads(line)) == record
