"""However Flower is started, it is safe by default: 127.0.0.1, basic auth, the ``flower`` ACL user.

Real processes: the embedded Redis with its ACL users, Flower started as ``celery -A xnai_tasks flower`` (and
as ``xnai flower``, the Procfile's line) with no option, and a real grok worker for the task page.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from tornado.escape import xhtml_escape

from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.ops.flower import ensure_credentials
from xnai_tasks.ops.proc import die_with_parent
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.security import acl, redis_urls
from xnai_tasks.settings import Settings

from support import free_port, short_home

CELERY_FLOWER = [sys.executable, "-m", "celery", "-A", "xnai_tasks", "flower"]
XNAI_FLOWER = [sys.executable, "-m", "xnai_tasks", "flower"]
#: The query Flower's tasks page sends for its table (the arguments it requires).
DATATABLE = "/tasks/datatable?draw=1&start=0&length=10&order%5B0%5D%5Bcolumn%5D=0&columns%5B0%5D%5Bdata%5D=name"


@pytest.fixture(scope="module")
def private_settings() -> Settings:
    return Settings(home=short_home(), flower_port=free_port(), model_mode="lazy")


def _admin(settings: Settings) -> redis.Redis:
    return broker.connect(redis_urls.connection_url(settings, acl.ADMIN))


def _get(url: str, auth: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _listening(pid: int) -> set[tuple[str, int]]:
    return {
        (conn.laddr.ip, conn.laddr.port)
        for conn in psutil.Process(pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }


@contextlib.contextmanager
def running_flower(
    settings: Settings, argv: list[str], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Flower started by ``argv`` with these settings and no FLOWER_* variable but ``env``, listening."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("XNAI_", "FLOWER_"))}
    full_env.update(settings.to_env())
    full_env.update(env or {})
    with open(settings.home / "flower-test.log", "ab") as log_file:
        proc = subprocess.Popen(  # our own interpreter
            argv,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    try:
        deadline = time.monotonic() + 60
        while not _listening(proc.pid):
            assert proc.poll() is None, f"Flower exited with {proc.returncode}"
            assert time.monotonic() < deadline, "Flower did not listen within 60 s"
            time.sleep(0.2)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _connections_before_flower(admin: redis.Redis) -> set[int]:
    """The ids of the connections Redis has, once the memory guard (the stack's other client) has connected."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        clients = admin.client_list()
        if any(client["user"] == acl.ADMIN and not client["cmd"].startswith("client") for client in clients):
            return {int(client["id"]) for client in clients}
        time.sleep(0.2)
    raise AssertionError("the memory guard did not connect within 30 s")


@pytest.fixture(scope="module")
def flower(private_stack: Stack, private_settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A xnai_tasks flower`` with no option, for the whole module."""
    with running_flower(private_settings, CELERY_FLOWER) as proc:
        yield proc


@pytest.mark.parametrize("argv", [CELERY_FLOWER, XNAI_FLOWER], ids=["celery-flower", "xnai-flower"])
def test_flower_listens_on_loopback_demands_credentials_and_connects_as_flower(
    private_stack: Stack, private_settings: Settings, argv: list[str]
) -> None:
    # Given the embedded Redis with its ACL users, and the connections it has before Flower starts
    admin = _admin(private_settings)
    before = _connections_before_flower(admin)
    port = private_settings.flower_port
    # When Flower is started with no option and no FLOWER_* variable
    with running_flower(private_settings, argv) as proc:
        # Then it listens on 127.0.0.1 only (it listened on 0.0.0.0 and [::])
        assert _listening(proc.pid) == {("127.0.0.1", port)}
        # And its dashboard and its task table (task kwargs) answer 401 without the credentials, 200 with them
        creds, new = ensure_credentials(private_settings)
        assert not new  # Flower made them
        for path in ("/", DATATABLE):
            url = f"http://127.0.0.1:{port}{path}"
            assert _get(url, None)[0] == 401, path
            assert _get(url, f"{creds.user}:wrong")[0] == 401, path
            assert _get(url, creds.basic_auth)[0] == 200, path
        # And every Redis connection it opened (its events, control and result connections) is the flower
        # user's: none is the copilot's
        deadline = time.monotonic() + 30
        opened: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            opened = [client for client in admin.client_list() if int(client["id"]) not in before]
            if any(client["cmd"] == "psubscribe" for client in opened):  # its event receiver is listening
                break
            time.sleep(0.5)
        assert any(client["cmd"] == "psubscribe" for client in opened), opened
        assert {client["user"] for client in opened} == {acl.FLOWER}, [(o["user"], o["cmd"]) for o in opened]
    admin.close()


def test_flower_refuses_to_start_with_credentials_others_can_read(home: Path) -> None:
    # Given Flower's credentials file made readable by others
    settings = Settings(home=home, flower_port=free_port())
    ensure_credentials(settings)
    (home / "flower.json").chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XNAI_", "FLOWER_"))}
    # When `celery -A xnai_tasks flower` starts, Then it stops before listening: one line, exit 2 (usage)
    done = subprocess.run(CELERY_FLOWER, env={**env, **settings.to_env()}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip()
        == f"xnai: {home / 'flower.json'} has mode 0644, readable by others: run chmod 600 {home / 'flower.json'}"
    )


@pytest.mark.parametrize(
    ("argv", "env", "address"),
    [
        ([*CELERY_FLOWER, "--address=127.0.0.3"], {}, "127.0.0.3"),
        (CELERY_FLOWER, {"FLOWER_ADDRESS": "127.0.0.2"}, "127.0.0.2"),
    ],
    ids=["--address", "FLOWER_ADDRESS"],
)
def test_an_address_given_explicitly_is_honoured(
    private_stack: Stack, private_settings: Settings, argv: list[str], env: dict[str, str], address: str
) -> None:
    # Given an address given on Flower's command line or in FLOWER_ADDRESS (another loopback one here)
    # When Flower starts, Then it listens there, not on our default
    with running_flower(private_settings, argv, env) as proc:
        assert _listening(proc.pid) == {(address, private_settings.flower_port)}


def test_queue_lengths_are_read_as_the_flower_user(flower: subprocess.Popen[bytes], private_settings: Settings) -> None:
    # Given three messages waiting in the curation queue (no worker consumes it here)
    admin = _admin(private_settings)
    queue = c.queue_for("curation")
    admin.lpush(queue, "a", "b", "c")
    creds, _ = ensure_credentials(private_settings)
    url = f"http://127.0.0.1:{private_settings.flower_port}/api/queues/length"
    try:
        # When Flower's queue-length API is asked
        status, body = _get(url, creds.basic_auth)
        # Then it answers with every role queue's length (it answered 500: Flower's socket helper sent no user name)
        assert status == 200, body
        lengths = {queue["name"]: queue["messages"] for queue in json.loads(body)["active_queues"]}
        assert lengths == {"copilot": 0, "cline": 0, "grok": 0, "curation": 3}
        # And when Redis refuses the read (the flower user may not LLEN, as on Redis 6.2), it says so: 503, one line
        admin.execute_command("ACL", "SETUSER", acl.FLOWER, "-llen")
        status, body = _get(url, creds.basic_auth)
        assert status == 503
        assert body.decode().startswith("queue lengths: Redis refused LLEN to the flower user")
        assert "\n" not in body.decode()
    finally:
        admin.execute_command("ACL", "SETUSER", acl.FLOWER, "+llen")
        admin.delete(queue)
        admin.close()


def _code_block(page: str, title: str) -> Any:
    """The JSON in the ``<code>`` block under ``title`` on Flower's task page."""
    found = re.search(rf"<dt>{title}</dt>\s*<dd><pre class=\"detail-code\"><code>(.*?)</code>", page, re.DOTALL)
    assert found is not None, title
    return json.loads(html.unescape(found.group(1)))


def test_task_page_shows_args_kwargs_and_whole_result_as_json(
    flower: subprocess.Popen[bytes], grok_worker: None, private_settings: Settings
) -> None:
    # Given a grok task run by a real worker, whose argument nests 5 levels deep, holds quotes and a newline, and
    # a text of 2,500 characters (the task returns it)
    value = {
        "title": 'it\'s "quoted"\nand on two lines',
        "deep": {"a": {"b": {"c": {"d": [1, 2.5, None, True]}}}},
        "text": "é" * 2500,
    }
    client = Client(private_settings)
    try:
        handle = client.submit("grok", "echo", value=value)
        assert handle.get(timeout=60) == value
    finally:
        client.close()
    creds, _ = ensure_credentials(private_settings)
    base = f"http://127.0.0.1:{private_settings.flower_port}"
    deadline = time.monotonic() + 30
    info: Any = None
    while time.monotonic() < deadline:
        status, body = _get(f"{base}/api/task/info/{handle.id}", creds.basic_auth)
        info = json.loads(body) if status == 200 else None
        if info and info.get("state") == "SUCCESS" and info.get("result"):
            break
        time.sleep(0.5)
    assert info and info["state"] == "SUCCESS", info
    # When Flower's page of that task is asked for
    status, body = _get(f"{base}/task/{handle.id}", creds.basic_auth)
    assert status == 200
    page = body.decode()
    # Then the result is whole, as indented JSON, its long text cut at 2,000 characters with the count cut
    # (Flower showed Celery's repr, cut at 1,024 characters and 3 levels)
    shown = {**value, "text": "é" * 2000 + "…[500 more characters]"}
    assert _code_block(page, "Result") == shown
    assert xhtml_escape(json.dumps(shown, indent=2, ensure_ascii=False)) in page
    # And args and kwargs are JSON, the nested argument written out whole (Celery's event text of the
    # arguments holds at most 1,024 characters, so the long text ends where Celery cut it)
    assert _code_block(page, "Arguments") == []
    kwargs = _code_block(page, "Keyword arguments")
    assert kwargs["value"]["title"] == value["title"]
    assert kwargs["value"]["deep"] == value["deep"]
    assert value["text"].startswith(kwargs["value"]["text"].removesuffix("..."))
    # And the task table shows the same JSON
    status, body = _get(f"{base}{DATATABLE.replace('length=10', 'length=100')}", creds.basic_auth)
    rows = {row["uuid"]: row for row in json.loads(body)["data"]}
    assert json.loads(rows[handle.id]["kwargs"])["value"]["deep"] == value["deep"]
    assert json.loads(rows[handle.id]["result"]) == shown
