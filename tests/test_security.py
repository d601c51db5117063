"""README, Security, over real workers: every refusal refuses, says why, executes nothing and loses nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group
from celery.result import AsyncResult
from nacl.signing import SigningKey

from xnai_tasks.client.sync import Client, TaskHandle
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected, ResultSignatureError, TaskRevokedError, UsageError
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security import acl, key_admin, keyring, redis_urls
from xnai_tasks.security.key_pair import Signer
from xnai_tasks.security.keyring import load_signer
from xnai_tasks.security.signature import SIG_HEADER
from xnai_tasks.settings import Settings

from support import publish_raw, resend, run_xnai


@pytest.fixture(scope="module")
def conn(stack: Stack, stack_settings: Settings) -> Iterator[redis.Redis]:
    connection = broker.connect(redis_urls.connection_url(stack_settings, acl.ADMIN))
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def copilot(stack: Stack, stack_settings: Settings) -> Signer:
    return load_signer(stack_settings.home, "copilot")


def refused_count(conn: redis.Redis, role: str, reason: str) -> int:
    return int(conn.hget(c.refused_counter_key(role), reason) or 0)


def assert_refused(
    conn: redis.Redis,
    settings: Settings,
    app: Celery,
    role: str,
    reason: str,
    send: Callable[[], str],
) -> dict[str, Any]:
    """Send one bad message and prove: refused for ``reason``, never executed, logged, counted, kept."""
    before = refused_count(conn, role, reason)
    task_id = send()
    deadline = time.monotonic() + 30
    while refused_count(conn, role, reason) == before:
        assert time.monotonic() < deadline, f"{role} never refused {task_id} as {reason}"
        time.sleep(0.05)
    # never executed: no result was ever stored for it but the worker's signed refusal (gate.RefusalNotice)
    result = AsyncResult(task_id, app=app)
    assert result.state in ("PENDING", "FAILURE")
    if result.state == "FAILURE":
        assert isinstance(result.result, MessageRejected) and result.result.reason == reason
    # rejected without requeue: nothing waits in the queue
    assert broker.queue_depth(conn, role) == 0
    # kept: the raw message is in the role's dead-letter list
    entries = [json.loads(raw) for raw in conn.lrange(c.dead_letter_key(role), 0, 50)]
    entry = next(e for e in entries if e["id"] == task_id)
    assert entry["reason"] == reason and entry["body"]
    # said why: one WARNING line with the reason and the id, without the body or key material
    lines = [json.loads(line) for line in (settings.log_dir / c.LOG_FILE).read_text().splitlines() if task_id in line]
    warnings = [line for line in lines if line["level"] == "WARNING" and line.get("reason") == reason]
    assert len(warnings) == 1, lines
    assert "\n" not in warnings[0]["msg"] and entry["body"] not in warnings[0]["msg"]
    signature = entry["headers"].get(SIG_HEADER)
    if isinstance(signature, dict) and signature.get("sig"):
        assert signature["sig"] not in warnings[0]["msg"]
    return entry


def assert_replay_refused_and_run_once(
    settings: Settings,
    app: Celery,
    conn: redis.Redis,
    role: str,
    task_id: str,
    headers: dict[str, Any],
    body: Any,
) -> None:
    """Send a message that already ran again, as is: it must be refused as a replay, having run once."""
    before = refused_count(conn, role, "replay")
    resend(app, role, headers, body)
    deadline = time.monotonic() + 30
    while refused_count(conn, role, "replay") == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runs = [
        line
        for line in (settings.log_dir / c.LOG_FILE).read_text().splitlines()
        if task_id in line and "succeeded" in line
    ]
    assert len(runs) == 1, runs


def test_unsigned_message_is_refused(
    stack: Stack, stack_settings: Settings, control_app: Celery, conn: redis.Redis
) -> None:
    # Given a message pushed by someone who can write to Redis but has no key
    def send() -> str:
        return publish_raw(control_app, task="cline.echo", queue="cline", kwargs={"value": "injected"})[0]

    # Then the cline worker refuses it as unsigned
    assert_refused(conn, stack_settings, control_app, "cline", "unsigned", send)


def test_bad_signature_is_refused(
    stack: Stack, stack_settings: Settings, control_app: Celery, conn: redis.Redis, copilot: Signer
) -> None:
    def flip(headers: dict[str, Any]) -> None:
        sig = headers[SIG_HEADER]["sig"]
        headers[SIG_HEADER]["sig"] = ("A" if sig[0] != "A" else "B") + sig[1:]

    def send() -> str:
        return publish_raw(control_app, task="cline.echo", queue="cline", signer=copilot, mutate=flip)[0]

    assert_refused(conn, stack_settings, control_app, "cline", "bad_signature", send)


def test_unknown_key_is_refused(stack: Stack, stack_settings: Settings, control_app: Celery, conn: redis.Redis) -> None:
    # Given a key that is not in the keyring, claiming to be the copilot
    stranger = Signer(agent="copilot", kid="0123456789abcdef", signing_key=SigningKey.generate())

    def send() -> str:
        return publish_raw(control_app, task="grok.echo", queue="grok", signer=stranger)[0]

    assert_refused(conn, stack_settings, control_app, "grok", "unknown_key", send)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task", "cline.health"),
        ("id", "00000000-0000-0000-0000-000000000000"),
        ("retries", 5),
        ("eta", "2030-01-01T00:00:00"),
    ],
)
def test_changed_covered_header_is_refused(
    stack: Stack,
    stack_settings: Settings,
    control_app: Celery,
    conn: redis.Redis,
    copilot: Signer,
    field: str,
    value: Any,
) -> None:
    # Given a validly signed message whose covered header is changed afterwards (renamed, id swapped, ...)
    sent: dict[str, str] = {}

    def change(headers: dict[str, Any]) -> None:
        headers[field] = value
        sent["id"] = str(headers["id"])

    def send() -> str:
        publish_raw(control_app, task="cline.echo", queue="cline", signer=copilot, mutate=change)
        return sent["id"]

    assert_refused(conn, stack_settings, control_app, "cline", "bad_signature", send)


def test_message_moved_to_another_roles_queue_is_refused(
    stack: Stack, stack_settings: Settings, control_app: Celery, conn: redis.Redis, copilot: Signer
) -> None:
    # Given a grok message signed for the grok queue, pushed unchanged into the curation queue
    def moved() -> str:
        return publish_raw(control_app, task="grok.echo", queue="curation", signer=copilot, sign_queue="grok")[0]

    assert_refused(conn, stack_settings, control_app, "curation", "wrong_queue", moved)

    # And a curation task signed for the grok queue, delivered in curation, is refused too
    def signed_elsewhere() -> str:
        return publish_raw(control_app, task="curation.echo", queue="curation", signer=copilot, sign_queue="grok")[0]

    assert_refused(conn, stack_settings, control_app, "curation", "wrong_queue", signed_elsewhere)


def test_key_not_authorized_for_the_role_is_refused(
    stack: Stack, stack_settings: Settings, control_app: Celery, conn: redis.Redis
) -> None:
    # Given the cline worker's key, which may dispatch cline tasks only
    cline_key = load_signer(stack_settings.home, "cline")

    def send() -> str:
        return publish_raw(control_app, task="curation.echo", queue="curation", signer=cline_key)[0]

    assert_refused(conn, stack_settings, control_app, "curation", "not_authorized", send)


def test_expired_and_future_messages_are_refused(
    stack: Stack, stack_settings: Settings, control_app: Celery, conn: redis.Redis, copilot: Signer
) -> None:
    old = time.time() - stack_settings.max_message_age - 60
    assert_refused(
        conn, stack_settings, control_app, "grok", "expired",
        lambda: publish_raw(control_app, task="grok.echo", queue="grok", signer=copilot, now=old)[0],
    )  # fmt: skip
    assert_refused(
        conn, stack_settings, control_app, "grok", "future",
        lambda: publish_raw(control_app, task="grok.echo", queue="grok", signer=copilot, now=time.time() + 3600)[0],
    )  # fmt: skip


def test_replayed_message_is_refused_and_runs_once(
    stack: Stack, stack_settings: Settings, control_app: Celery, conn: redis.Redis, copilot: Signer
) -> None:
    # Given a signed message that ran
    task_id, headers, body = publish_raw(
        control_app, task="cline.echo", queue="cline", signer=copilot, kwargs={"value": "once"}
    )
    assert AsyncResult(task_id, app=control_app).get(timeout=30) == "once"
    # (its nonce is marked done together with its result)
    assert conn.get(c.nonce_key("cline", headers[SIG_HEADER]["nonce"])) == b"done"
    # When the captured message is sent again, as is, Then it is refused as a replay and did not run twice
    assert_replay_refused_and_run_once(stack_settings, control_app, conn, "cline", task_id, headers, body)


def test_revoked_key_is_refused(stack: Stack, stack_settings: Settings, control_app: Celery, conn: redis.Redis) -> None:
    # Given an extra agent allowed to dispatch cline tasks, whose key is then revoked
    home = stack_settings.home
    key_admin.init_keys(home, agents=("tester",))
    key_admin.authorize(home, "tester", ["cline.*"])
    tester = load_signer(home, "tester")
    time.sleep(keyring.REFRESH_S + 0.5)  # workers re-read the keyring at most this often
    task_id = publish_raw(control_app, task="cline.echo", queue="cline", signer=tester, kwargs={"value": "ok"})[0]
    assert AsyncResult(task_id, app=control_app).get(timeout=30) == "ok"
    key_admin.revoke(home, tester.kid)
    time.sleep(keyring.REFRESH_S + 0.5)
    # When it signs another message, Then that is refused
    assert_refused(
        conn, stack_settings, control_app, "cline", "revoked_key",
        lambda: publish_raw(control_app, task="cline.echo", queue="cline", signer=tester)[0],
    )  # fmt: skip


def test_a_flood_of_bad_messages_does_not_starve_good_work(
    stack: Stack, stack_settings: Settings, control_app: Celery, conn: redis.Redis, client: Client
) -> None:
    # Given 1,000 unsigned or badly signed messages interleaved with 100 good ones
    before = sum(int(v) for v in conn.hgetall(c.refused_counter_key("curation")).values())
    stranger = Signer(agent="copilot", kid="fedcba9876543210", signing_key=SigningKey.generate())
    bad_ids: list[str] = []
    good: list[TaskHandle] = []
    for i in range(1000):
        bad_ids.append(
            publish_raw(control_app, task="curation.echo", queue="curation", signer=stranger if i % 2 else None)[0]
        )
        if i % 10 == 0:
            good.append(client.submit("curation", "echo", value=i))
    # Then all 100 good ones are done, with the right values
    assert [h.get(timeout=120) for h in good] == list(range(0, 1000, 10))
    # And none of the bad ones ran; all were refused and counted
    deadline = time.monotonic() + 60
    while sum(int(v) for v in conn.hgetall(c.refused_counter_key("curation")).values()) < before + 1000:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert all(AsyncResult(task_id, app=control_app).state in ("PENDING", "FAILURE") for task_id in bad_ids[::50])
    assert conn.llen(c.dead_letter_key("curation")) <= c.DEAD_LETTER_MAX


def test_status_shows_refusals_and_dead_letters(stack: Stack, stack_settings: Settings) -> None:
    from support import run_xnai

    status = json.loads(run_xnai(["status", "--json"], stack_settings).stdout)
    assert status["roles"]["cline"]["refused"].get("unsigned", 0) >= 1
    done = run_xnai(["status", "--dead-letters", "cline", "--limit", "3"], stack_settings)
    assert done.returncode == 0
    entries = [json.loads(line) for line in done.stdout.splitlines()]
    assert 1 <= len(entries) <= 3 and all("reason" in e and "body" in e for e in entries)


# ---- signed results ----


def _stored(conn: redis.Redis, role: str, task_id: str) -> dict[str, Any]:
    return dict(json.loads(conn.get(c.result_key(role, task_id)) or b"{}"))


def test_results_are_signed_by_the_worker(stack: Stack, client: Client, conn: redis.Redis) -> None:
    handle = client.submit("grok", "echo", value={"x": 1})
    assert handle.get(timeout=30) == {"x": 1}
    meta = _stored(conn, "grok", handle.id)
    assert meta[SIG_HEADER]["agent"] == "grok"


@pytest.mark.parametrize("forgery", ["missing", "tampered", "forged", "wrong_signer"])
def test_forged_results_are_refused_by_the_client(
    stack: Stack, stack_settings: Settings, client: Client, conn: redis.Redis, forgery: str
) -> None:
    # Given a real result in Redis
    handle = client.submit("grok", "echo", value="genuine")
    assert handle.get(timeout=30) == "genuine"
    meta = _stored(conn, "grok", handle.id)
    # When someone with Redis access changes it
    if forgery == "missing":
        del meta[SIG_HEADER]
    elif forgery == "tampered":
        meta["result"] = "forged"
    elif forgery == "forged":
        meta[SIG_HEADER]["sig"] = meta[SIG_HEADER]["sig"][::-1]
    else:  # a valid signature, but by the cline worker, for a task sent to grok
        from xnai_tasks.security.result_signature import sign_result

        meta[SIG_HEADER] = sign_result(
            load_signer(stack_settings.home, "cline"), task_id=handle.id, status="SUCCESS", result="genuine"
        )
    conn.set(c.result_key("grok", handle.id), json.dumps(meta))
    # Then a fresh handle on that task refuses the result with a clear error
    fresh = TaskHandle(AsyncResult(handle.id, app=client.app), "grok", "echo", client._ready())
    with pytest.raises(ResultSignatureError, match="not authentic"):
        fresh.get(timeout=10)


# ---- everything Celery sends is signed: retries, chains, groups, chords, subtasks ----


def test_retries_chains_groups_and_chords_are_signed(stack: Stack, client: Client) -> None:
    app = client.app
    # a retry is a new message sent by the worker, signed with its key
    assert client.submit("cline", "echo", value="after retries", retries=2).get(timeout=60) == "after retries"
    # a chain: the second task is sent by the cline worker when the first finishes
    with client.signing():
        chained = chain(app.signature("cline.echo", kwargs={"value": 1}), app.signature("cline.echo")).apply_async()
        grouped = group(app.signature("grok.echo", kwargs={"value": i}) for i in range(5)).apply_async()
        header = [app.signature("curation.echo", kwargs={"value": i}) for i in range(4)]
        chorded = chord(header)(app.signature("curation.echo"))
    assert chained.get(timeout=60) == 1
    # a group
    assert grouped.get(timeout=60) == list(range(5))
    # a chord: the callback is sent by whichever curation child finishes last
    assert chorded.get(timeout=60) == [0, 1, 2, 3]


def test_subtask_to_a_role_the_worker_may_not_dispatch_never_runs(
    stack: Stack, stack_settings: Settings, client: Client, control_app: Celery, conn: redis.Redis
) -> None:
    # Given a chain whose second step is a grok task, which the cline worker would have to send
    app = client.app
    with client.signing():
        result = chain(app.signature("cline.echo", kwargs={"value": 1}), app.signature("grok.echo")).apply_async()
    first = result.parent
    first.get(timeout=30, propagate=False)
    # Then the cline step fails loudly: its user may not push to the grok queue (Redis ACL) ...
    assert first.failed() and "no permissions" in str(first.result)
    # ... and the grok step never reaches a worker (Celery marks it failed along with its parent)
    assert result.state in ("PENDING", "FAILURE")
    log_lines = (stack_settings.log_dir / c.LOG_FILE).read_text().splitlines()
    assert not [line for line in log_lines if result.id in line and "received" in line]
    # ... and even pushed there by someone who can, a grok task signed with cline's key is refused
    cline_key = load_signer(stack_settings.home, "cline")
    assert_refused(
        conn, stack_settings, control_app, "grok", "not_authorized",
        lambda: publish_raw(control_app, task="grok.echo", queue="grok", signer=cline_key)[0],
    )  # fmt: skip


def test_another_role_cannot_reset_a_finished_messages_nonce(
    stack: Stack, stack_settings: Settings, control_app: Celery, conn: redis.Redis, copilot: Signer
) -> None:
    # Given a grok message that ran
    task_id, headers, body = publish_raw(
        control_app, task="grok.echo", queue="grok", signer=copilot, kwargs={"value": "ledger"}
    )
    assert AsyncResult(task_id, app=control_app).get(timeout=30) == "ledger"
    key = c.nonce_key("grok", headers[SIG_HEADER]["nonce"])
    # When cline's credential tries to delete, overwrite or expire that message's nonce
    cline = broker.connect(redis_urls.connection_url(stack_settings, "cline"))
    attempts: list[Callable[[], object]] = [
        lambda: cline.delete(key),
        lambda: cline.set(key, b"seen"),
        lambda: cline.expire(key, 1),
        lambda: cline.unlink(key),
    ]
    for attempt in attempts:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    cline.close()
    # Then the ledger still says done, and the message sent again is refused as a replay and does not run
    assert conn.get(key) == b"done"
    assert_replay_refused_and_run_once(stack_settings, control_app, conn, "grok", task_id, headers, body)


def test_a_fake_result_published_on_the_channel_is_ignored(
    stack: Stack, stack_settings: Settings, client: Client
) -> None:
    # Given a task the client waits on, slow enough for a forger to answer first
    handle = client.submit("grok", "echo", value="the real one", delay_s=1.5)
    # When a role's credential publishes a fake, unsigned FAILURE for it on the result channel it may use
    cline = broker.connect(redis_urls.connection_url(stack_settings, "cline"))
    fake = {"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["forged"]}, "task_id": handle.id}
    for _ in range(3):
        cline.publish(c.result_key("cline", handle.id), json.dumps(fake))
        time.sleep(0.1)
    # (grok's own channel is closed to it)
    with pytest.raises(redis.exceptions.NoPermissionError):
        cline.publish(c.result_key("grok", handle.id), json.dumps(fake))
    cline.close()
    # Then the client ignores it and returns the real, signed result
    assert handle.get(timeout=30) == "the real one"


def test_a_revoked_task_raises_instead_of_returning_the_error(
    stack: Stack, control_app: Celery, client: Client, conn: redis.Redis
) -> None:
    # Given a running task
    handle = client.submit("grok", "echo", value="never", delay_s=20)
    time.sleep(1.0)
    # When the copilot revokes it (a signed control command) and terminates it
    control_app.control.revoke(handle.id, terminate=True)
    # Then waiting for it raises, naming the revocation
    with pytest.raises(TaskRevokedError, match="revoked"):
        handle.get(timeout=30)
    # And only grok recorded it: the other workers, which got the same broadcast, wrote nothing
    assert [role for role in c.ROLES if conn.exists(c.result_key(role, handle.id))] == ["grok"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_infinity_are_refused_at_submit(
    stack: Stack, stack_settings: Settings, client: Client, value: float
) -> None:
    # When an argument is not JSON, Then the client refuses before sending anything
    with pytest.raises(UsageError, match="NaN and infinity are not allowed"):
        client.submit("grok", "echo", value=value)
    # And the CLI says so in one line, exit 2
    done = run_xnai(["submit", "grok", "echo", "--kwargs", '{"value": NaN}'], stack_settings)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "NaN" in done.stderr, done.stderr


def test_deep_arguments_are_refused_at_submit_and_by_the_gate(
    stack: Stack, control_app: Celery, conn: redis.Redis, client: Client, copilot: Signer
) -> None:
    # Given arguments nested 900 levels deep, as a legitimate but careless client might send
    deep: Any = "bottom"
    for _ in range(900):
        deep = [deep]
    # When the client submits them, Then it refuses before sending
    with pytest.raises(UsageError, match="nest more than"):
        client.submit("grok", "echo", value=deep)
    # And a signed message carrying them straight into the queue is refused by the gate, before the pool
    before = refused_count(conn, "grok", "malformed")
    publish_raw(control_app, task="grok.echo", queue="grok", signer=copilot, kwargs={"value": deep})
    deadline = time.monotonic() + 30
    while refused_count(conn, "grok", "malformed") == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # And the worker is still there and working
    assert client.submit("grok", "echo", value="alive").get(timeout=30) == "alive"


GOOD_ENVELOPE: dict[str, Any] = {
    "body": "W10=",
    "content-encoding": "utf-8",
    "content-type": "application/json",
    "headers": {},
    "properties": {"delivery_tag": "t", "body_encoding": "base64", "delivery_info": {}, "priority": 0},
}
GARBAGE = {
    "not JSON": "this is not json",
    "a list": "[1, 2, 3]",
    "no properties": json.dumps({"body": "e30=", "headers": {}}),
    "headers a list": json.dumps({**GOOD_ENVELOPE, "headers": [1, 2]}),
    "headers a string": json.dumps({**GOOD_ENVELOPE, "headers": "x"}),
    "body not base64": json.dumps({**GOOD_ENVELOPE, "body": "!!!not base64!!!"}),
    "10,000 headers": json.dumps({**GOOD_ENVELOPE, "headers": {f"h{i}": i for i in range(10_000)}}),
    "wrong content type": json.dumps({**GOOD_ENVELOPE, "content-type": "application/x-python-serialize"}),
    "oversized": json.dumps({**GOOD_ENVELOPE, "body": "A" * (20 * 1024 * 1024)}),
}


def test_garbage_in_a_queue_is_refused_at_the_door_and_disturbs_nothing(
    stack: Stack, stack_settings: Settings, conn: redis.Redis, client: Client
) -> None:
    # Given a task running on cline's worker
    running = client.submit("cline", "echo", value="undisturbed", delay_s=3)
    time.sleep(0.5)
    before = refused_count(conn, "cline", "malformed")
    # When cline's own credential pushes every kind of malformed item into its queue
    cline = broker.connect(redis_urls.connection_url(stack_settings, "cline"))
    for raw in GARBAGE.values():
        cline.lpush("cline", raw)
    cline.close()
    # Then each is refused as malformed and kept, with its reason
    deadline = time.monotonic() + 60
    while refused_count(conn, "cline", "malformed") < before + len(GARBAGE):
        assert time.monotonic() < deadline, refused_count(conn, "cline", "malformed") - before
        time.sleep(0.1)
    entries = [json.loads(raw) for raw in conn.lrange(c.dead_letter_key("cline"), 0, 200)]
    details = [e["detail"] for e in entries if e["reason"] == "malformed"]
    for expected in ("not JSON", "JSON list", "no properties", "headers are a list", "headers are a str",
                     "not base64", "10000 headers", "content type", "bytes, more than"):  # fmt: skip
        assert any(expected in d for d in details), (expected, details)
    # And the running task finishes, the worker is still up, and new work runs
    assert running.get(timeout=30) == "undisturbed"
    assert stack.children["cline"].poll() is None
    assert client.submit("cline", "echo", value="after").get(timeout=30) == "after"
