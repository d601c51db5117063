"""Remote control is signed: a role's credential cannot command other workers, replay a command, forge a
reply, or read a password out of a reply, a page or a log.

Every attack runs as a hostile role would: a Celery app or a bare kombu mailbox on the cline ACL user's
connection, against the real stack (embedded Redis with ACLs, one worker per role, Flower).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection
from kombu.pidbox import Mailbox, Node

from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.core.nodes import workers_online
from xnai_tasks.observability.status import collect_status
from xnai_tasks.ops.flower import ensure_credentials
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security import acl, password_file, redis_urls
from xnai_tasks.security.keyring import SignerSource
from xnai_tasks.security.publish import signing_as
from xnai_tasks.settings import Settings

COMMANDS: list[tuple[str, dict[str, Any]]] = [
    ("shutdown", {}),
    ("pool_grow", {"n": 2}),
    ("rate_limit", {"task_name": "grok.echo", "rate_limit": "1/m"}),
    ("add_consumer", {"queue": "cline"}),
    ("cancel_consumer", {"queue": "grok"}),
    ("revoke", {"task_id": "00000000-0000-0000-0000-000000000000", "terminate": True}),
]


@pytest.fixture(scope="module")
def admin(stack: Stack, stack_settings: Settings) -> Iterator[redis.Redis]:
    conn = broker.connect(redis_urls.connection_url(stack_settings, acl.ADMIN))
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def as_cline(stack: Stack, stack_settings: Settings) -> Iterator[Celery]:
    """A Celery app connected with the cline role's Redis credential, signing nothing of its own."""
    url = redis_urls.connection_url(stack_settings, "cline")
    app = create_app(Settings(home=stack_settings.home, redis_url=url), main="xnai_test_hostile")
    app.conf.xnai_control_agent = None
    yield app
    app.close()


def grok_node(control_app: Celery) -> str:
    (node,) = workers_online(control_app)["grok"]
    return node


def control_refusals(admin: redis.Redis, role: str) -> dict[str, int]:
    raw = admin.hgetall(c.refused_counter_key(role))
    return {k.decode(): int(v) for k, v in raw.items() if k.decode().startswith("control_")}


def wait_for_count(admin: redis.Redis, role: str, reason: str, at_least: int) -> None:
    deadline = time.monotonic() + 15
    while control_refusals(admin, role).get(reason, 0) < at_least:
        assert time.monotonic() < deadline, control_refusals(admin, role)
        time.sleep(0.05)


@pytest.mark.parametrize("signed_as_cline", [False, True], ids=["unsigned", "signed-by-cline"])
def test_a_role_credential_cannot_command_another_roles_worker(
    signed_as_cline: bool,
    stack: Stack,
    stack_settings: Settings,
    control_app: Celery,
    as_cline: Celery,
    admin: redis.Redis,
    client: Client,
) -> None:
    # Given grok's worker, its pool and its queues, seen through the copilot's signed inspect
    node = grok_node(control_app)
    inspect = control_app.control.inspect(destination=[node], timeout=2)
    pool_before = inspect.stats()[node]["pool"]["processes"]
    reason = "control_not_authorized" if signed_as_cline else "control_unsigned"
    before = control_refusals(admin, "grok").get(reason, 0)
    # When cline's credential broadcasts every command that changes a worker (signed with cline's own key or not)
    cline_key = SignerSource(stack_settings.home, "cline")
    for command, arguments in COMMANDS:
        if signed_as_cline:
            with signing_as(cline_key):
                as_cline.control.broadcast(command, arguments=arguments, destination=[node])
        else:
            as_cline.control.broadcast(command, arguments=arguments, destination=[node])
    # Then grok refuses each one, says why, and obeys none
    wait_for_count(admin, "grok", reason, before + len(COMMANDS))
    assert stack.children["grok"].poll() is None
    assert inspect.stats()[node]["pool"]["processes"] == pool_before
    queues = {q["name"] for q in inspect.active_queues()[node]}
    assert queues == {"grok"}
    assert client.submit("grok", "echo", value="still here").get(timeout=30) == "still here"


def test_a_captured_copilot_command_cannot_be_replayed(
    stack: Stack, stack_settings: Settings, control_app: Celery, admin: redis.Redis
) -> None:
    # Given a copilot-signed command captured off the broadcast channel, as any role can subscribe to it
    node = grok_node(control_app)
    listener = admin.pubsub()
    listener.subscribe(acl.fanout_channel(acl.PIDBOX_EXCHANGE))
    listener.get_message(timeout=1)
    replies = control_app.control.broadcast(
        "rate_limit", arguments={"task_name": "grok.echo", "rate_limit": None}, destination=[node], reply=True
    )
    assert replies and node in replies[0]  # the real sender's command ran
    captured = None
    deadline = time.monotonic() + 5
    while captured is None and time.monotonic() < deadline:
        message = listener.get_message(timeout=1)
        if message and message["type"] == "message":
            captured = message["data"]
    listener.close()
    assert captured is not None
    before = control_refusals(admin, "grok").get("control_replay", 0)
    # When it is published again
    admin.publish(acl.fanout_channel(acl.PIDBOX_EXCHANGE), captured)
    # Then grok refuses it as a replay
    wait_for_count(admin, "grok", "control_replay", before + 1)


def test_forged_ping_replies_do_not_make_a_node_look_online(
    stack: Stack, stack_settings: Settings, control_app: Celery
) -> None:
    # Given a hostile process on cline's credential that answers every ping, unsigned, as its own node
    # "cline@ghost" and, in a second reply, as "grok@ghost" (the reply body names the node)
    url = redis_urls.connection_url(stack_settings, "cline")
    stop = threading.Event()
    answered = threading.Event()

    class Impostor(Node):  # type: ignore[misc]
        def reply(self, data: Any, exchange: str, routing_key: str, ticket: str, **kwargs: Any) -> None:
            super().reply(data, exchange, routing_key, ticket, **kwargs)
            super().reply({"grok@ghost": {"ok": "pong"}}, exchange, routing_key, ticket, **kwargs)
            answered.set()

    def impersonate() -> None:
        with Connection(url) as conn:
            mailbox = Mailbox("celery", type="fanout", accept=["json"], serializer="json")(conn)
            mailbox.node_cls = Impostor
            node = mailbox.Node("cline@ghost", handlers={"ping": lambda state, **_: {"ok": "pong"}})
            node.listen(conn.default_channel)
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:  # socket.timeout
                    continue

    thread = threading.Thread(target=impersonate, daemon=True)
    thread.start()
    time.sleep(1.0)
    try:
        # When the copilot asks who is online
        online = workers_online(control_app, timeout=1.5)
        status = collect_status(stack_settings)
    finally:
        stop.set()
        thread.join(5)
    # Then the forged replies were sent, and neither the copilot nor `xnai status` believes them
    assert answered.is_set()
    nodes = [n for names in online.values() for n in names]
    assert "grok@ghost" not in nodes and "cline@ghost" not in nodes
    assert all("ghost" not in n for info in status["roles"].values() for n in info["workers"])
    assert online.get("grok")  # the real one still is


def test_no_password_in_replies_flower_pages_or_logs(
    stack: Stack, stack_settings: Settings, control_app: Celery
) -> None:
    # Given every ACL user's password
    passwords = [p for p in json.loads(password_file.passwords_path(stack_settings.home).read_text()).values()]
    # When the copilot inspects every worker (stats report the broker connection) and its configuration
    inspect = control_app.control.inspect(timeout=2)
    replies = json.dumps([inspect.stats(), inspect.conf(), inspect.active_queues()], default=str)
    # And Flower's API and pages are read with its credentials
    creds, _ = ensure_credentials(stack_settings)
    base = f"http://127.0.0.1:{stack_settings.flower_port}"
    pages = []
    for path in ("/api/workers?refresh=1", "/workers", "/broker", f"/worker/{grok_node(control_app)}"):
        request = urllib.request.Request(base + path)
        request.add_header("Authorization", "Basic " + base64.b64encode(creds.basic_auth.encode()).decode())
        with urllib.request.urlopen(request, timeout=20) as response:
            pages.append(response.read().decode("utf-8", "replace"))
    logs = "".join(p.read_text(errors="replace") for p in stack_settings.log_dir.glob("*"))
    # Then no password appears anywhere (and the replies did carry the broker connection, masked)
    assert "***@" in replies
    assert "grok@" in pages[0]
    for password in passwords:
        assert password not in replies
        assert all(password not in page for page in pages)
        assert password not in logs


def test_flower_may_wake_workers_for_heartbeats_but_not_stop_them(
    stack: Stack, stack_settings: Settings, control_app: Celery, admin: redis.Redis
) -> None:
    # Given an app on Flower's credential, signing as Flower (as `celery -A xnai_tasks flower` does)
    url = redis_urls.connection_url(stack_settings, "flower")
    flower = create_app(Settings(home=stack_settings.home, redis_url=url), main="xnai_test_flower")
    flower.conf.xnai_control_agent = None
    node = grok_node(control_app)
    before = control_refusals(admin, "grok").get("control_not_authorized", 0)
    try:
        # When it broadcasts the heartbeat wake-up its event receiver sends at start, then a shutdown
        with signing_as(SignerSource(stack_settings.home, "flower")):
            flower.control.broadcast("heartbeat", destination=[node])
            flower.control.broadcast("shutdown", destination=[node])
        # Then only the shutdown is refused (and not obeyed): the heartbeat is no dead letter
        wait_for_count(admin, "grok", "control_not_authorized", before + 1)
        time.sleep(1.0)
        assert control_refusals(admin, "grok").get("control_not_authorized", 0) == before + 1
        assert stack.children["grok"].poll() is None
    finally:
        flower.close()
