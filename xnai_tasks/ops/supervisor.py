"""``xnai up``: the whole system in the foreground, the same processes as the Procfile.

Every child runs in a session of its own, so a signal reaches only this supervisor, which then stops
each child's whole process group (the Celery pool children included): SIGTERM, then SIGKILL after a
grace period. Nothing is left behind. A child that exits while the system runs (a worker killed, a
crash) is started again with backoff, and says so in one line: one process's exit never stops the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

import psutil
from celery import Celery
from kombu.exceptions import OperationalError
from redis import RedisError

from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.core.nodes import workers_online
from xnai_tasks.errors import BrokerUnreachableError, ProcessError, RedisServerError
from xnai_tasks.observability.metrics import child_env as metrics_child_env
from xnai_tasks.observability.metrics import prepare_dir as prepare_metrics_dir
from xnai_tasks.ops.flower import ensure_credentials
from xnai_tasks.ops.proc import die_with_parent
from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.security.key_admin import init_keys
from xnai_tasks.settings import Settings

log = logging.getLogger(__name__)

STOP_GRACE_S = 20.0
#: A process that dies is started again after RESTART_FIRST_S, doubling while it keeps dying within
#: RESTART_STABLE_S of its start, up to RESTART_MAX_S (a crash loop costs little and shows in one line each time).
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
RESTART_STABLE_S = 60.0
#: The embedded Redis is started again at once the first time (every other process waits for it), then with backoff.
REDIS_RESTART_FIRST_S = 0.0
REDIS = "redis"


class _StopSignals:
    """Whether this process turned SIGINT and SIGTERM into :class:`StopRequested` (stopping then ignores them)."""

    def __init__(self) -> None:
        self.installed = False


_stop_signals = _StopSignals()


@dataclass(frozen=True)
class ProcessSpec:
    """One line of the Procfile: a name and the ``xnai`` command it runs."""

    name: str
    args: tuple[str, ...]

    def procfile_line(self) -> str:
        return f"{self.name}: xnai {' '.join(self.args)}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "xnai_tasks", *self.args]


def process_specs(
    roles: tuple[str, ...] = c.ROLES,
    *,
    flower: bool = True,
    redis: bool = True,
    guard: bool = True,
    metrics: bool = True,
    tls: bool = False,
) -> list[ProcessSpec]:
    """The processes of the system, in start order. The Procfile is this list with every option on but ``tls``.

    The memory guard (:mod:`xnai_tasks.ops.memory_guard`) watches the embedded Redis; it has no use on an external one.
    ``tls``: the embedded Redis' TLS terminator (:mod:`xnai_tasks.ops.tls_proxy`; XNAI_REDIS_TLS_PORT set; under
    honcho ``xnai redis`` runs it).
    """
    specs = [ProcessSpec("redis", ("redis",))] if redis else []
    if tls:
        specs.append(ProcessSpec("tls", ("tls", "serve")))
    if guard:
        specs.append(ProcessSpec("guard", ("guard",)))
    for role in c.ROLES:
        if role in roles:
            extra = ("--beat",) if role == "copilot" else ()
            specs.append(ProcessSpec(role, ("worker", role, *extra)))
    if flower:
        specs.append(ProcessSpec("flower", ("flower",)))
    if metrics:  # the Prometheus endpoint (observability/metrics_exporter.py)
        specs.append(ProcessSpec("metrics", ("metrics",)))
    return specs


def render_procfile() -> str:
    """The Procfile's text."""
    return "".join(spec.procfile_line() + "\n" for spec in process_specs())


@dataclass
class Stack:
    """A running system: embedded Redis (unless external), role workers, optionally Flower."""

    settings: Settings
    _: KW_ONLY
    roles: tuple[str, ...] = c.ROLES
    flower: bool = True
    #: ``xnai metrics`` on XNAI_METRICS_PORT (``xnai up`` turns it on; off by default so that stacks run side by
    #: side, as the tests do, do not contend for one port).
    metrics: bool = False
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    redis: EmbeddedRedis | None = None
    restarts: dict[str, Restart] = field(default_factory=dict)
    #: How the embedded Redis last exited while it ran (recorded in it once it is back, for ``xnai status``).
    redis_exit: str | None = None
    #: Where the children's own output goes (``NAME.out`` per process); None: this process's terminal.
    output_dir: Path | None = None

    def start(self) -> Stack:
        """Start everything; Redis first, so workers find it. Keys are made on first run.

        An external Redis that does not answer is :class:`BrokerUnreachableError` before anything starts.
        """
        if not self.settings.embedded:
            broker.require_reachable(self.settings)
        init_keys(self.settings.home)
        prepare_metrics_dir(self.settings, clean=True)  # counts of an earlier run are not this run's
        tls = self.settings.embedded and self.settings.redis_tls_port is not None
        if tls:  # a missing certificate is one line now, not a terminator that keeps dying
            from xnai_tasks.ops.tls_proxy import TlsProxy

            TlsProxy.for_settings(self.settings)
        if self.settings.embedded:
            self.redis = EmbeddedRedis(self.settings).start()
            self._redis_restart().started = time.monotonic()
        if self.flower:
            creds, new = ensure_credentials(self.settings)
            if new:
                print(f"Flower credentials (shown once, kept in {self.settings.home}): {creds.basic_auth}")
        for spec in process_specs(
            self.roles, flower=self.flower, redis=False, guard=self.settings.embedded, metrics=self.metrics, tls=tls
        ):
            self._spawn(spec)
        return self

    def _spawn(self, spec: ProcessSpec) -> None:
        env = {**os.environ, **self.settings.to_env(), **metrics_child_env(self.settings)}
        output: IO[bytes] | None = None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            output = (self.output_dir / f"{spec.name}.out").open("ab")
        try:
            self.children[spec.name] = subprocess.Popen(  # our own interpreter and module
                spec.argv(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            if output is not None:
                output.close()  # the child holds its own copy
        restart = self.restarts.setdefault(spec.name, Restart(spec))
        restart.started = time.monotonic()
        log.info("started %s (pid %d)", spec.name, self.children[spec.name].pid)

    def wait_workers(self, app: Celery, timeout: float = 120.0) -> dict[str, list[str]]:
        """Wait until every started role has a worker answering ``ping``; return the node names per role."""
        deadline = time.monotonic() + timeout
        wanted = set(self.roles)
        online: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                online = workers_online(app)
            except (OperationalError, RedisError, OSError) as exc:
                raise BrokerUnreachableError(f"lost the broker while waiting for the workers: {exc}") from None
            if wanted <= set(online):
                return online
            time.sleep(0.5)
        missing = ", ".join(sorted(wanted - set(online)))
        raise ProcessError(f"no worker answered for {missing} within {timeout:.0f} s")

    def check_alive(self) -> None:
        """Raise if a child has exited."""
        for name, proc in self.children.items():
            if proc.poll() is not None:
                raise ProcessError(f"{name} exited with code {proc.returncode}")

    def run_forever(self, say: Callable[[str], None] = print) -> None:
        """Keep every child running until a stop signal arrives (raises StopRequested).

        A child that exits is started again with backoff, and each exit and restart is one line to ``say``.
        """
        while True:
            self.restart_exited(say)
            time.sleep(0.2)

    def restart_exited(self, say: Callable[[str], None]) -> None:
        """Schedule a restart for each child that exited, and start those whose backoff has passed.

        The embedded Redis too: started again on the same socket with the same config and its AOF, it comes back
        with the queues, unacked messages, results and nonces it had; the workers and clients reconnect to it.
        """
        now = time.monotonic()
        self._supervise_redis(now, say)
        for name, proc in list(self.children.items()):
            code = proc.poll()
            if code is None:
                continue
            restart = self.restarts[name]
            if restart.due is None:
                _signal_group(proc, signal.SIGKILL)  # a dead worker's pool children must not linger
                delay = restart.schedule(now)
                say(f"xnai up: {name} exited ({_exit_text(code)}); restarting in {delay:.0f} s")
                log.warning("%s exited (%s); restarting in %.0f s", name, _exit_text(code), delay)
            elif now >= restart.due:
                restart.due = None
                self._spawn(restart.spec)
                say(f"xnai up: {name} restarted (pid {self.children[name].pid})")

    def _redis_restart(self) -> Restart:
        return self.restarts.setdefault(REDIS, Restart(ProcessSpec(REDIS, (REDIS,)), first_delay=REDIS_RESTART_FIRST_S))

    def _supervise_redis(self, now: float, say: Callable[[str], None]) -> None:
        """Start the embedded Redis again when the one this stack started has exited (a reused one is not ours)."""
        server = self.redis
        if server is None or server.reused:
            return
        restart = self._redis_restart()
        if restart.due is None:
            code = server.exit_code()
            if code is None:
                return
            delay = restart.schedule(now)
            self.redis_exit = _exit_text(code)
            say(f"xnai up: redis exited ({self.redis_exit}); {_restarting(delay)}")
            log.warning("redis exited (%s); restarting in %.0f s", _exit_text(code), delay)
        if now < (restart.due or now):
            return
        restart.due = None
        try:
            server.restart()
        except RedisServerError as exc:
            delay = restart.schedule(time.monotonic())
            say(f"xnai up: redis did not start ({exc}); {_restarting(delay)}")
            return
        restart.started = time.monotonic()
        pid = server.process.pid if server.process else None
        _record_redis_restart(server, self.redis_exit or "unknown cause", pid)
        say(f"xnai up: redis restarted (pid {pid or '?'})")

    def stop(self) -> None:
        """Stop every child's process group, then Redis. A second signal cannot interrupt it."""
        _ignore_stop_signals()
        started = _descendants(self.children.values())
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown: the worker lets running tasks finish
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in %.0f s, killing it", proc.pid, STOP_GRACE_S)
        for proc in self.children.values():
            _signal_group(proc, signal.SIGKILL)  # pool children whose parent is gone, stragglers
            proc.wait()
        self.children.clear()
        for leftover in started:  # e.g. a pool child that left its parent's process group
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass
class Restart:
    """When a supervised process was started, and when it is due to start again after it exited."""

    spec: ProcessSpec
    _: KW_ONLY
    started: float = 0.0
    delay: float | None = None
    due: float | None = None
    first_delay: float = RESTART_FIRST_S

    def schedule(self, now: float) -> float:
        """Set the next start: the first delay after a stable run, else twice the last one (at least
        RESTART_FIRST_S, capped)."""
        stable = now - self.started >= RESTART_STABLE_S
        if stable or self.delay is None:
            self.delay = self.first_delay
        else:
            self.delay = min(max(self.delay * 2, RESTART_FIRST_S), RESTART_MAX_S)
        self.due = now + self.delay
        return self.delay


def _restarting(delay: float) -> str:
    return f"restarting in {delay:.0f} s" if delay else "restarting now"


def _record_redis_restart(server: EmbeddedRedis, cause: str, pid: int | None) -> None:
    """Keep the restart in Redis itself, where ``xnai status`` reads it; a failure to write is only logged."""
    event = json.dumps({"ts": time.time(), "cause": cause, "pid": pid})
    try:
        conn = server.client()
        try:
            conn.pipeline().lpush(c.redis_restarts_key(), event).ltrim(
                c.redis_restarts_key(), 0, c.REDIS_RESTARTS_MAX - 1
            ).execute()
        finally:
            conn.close()
    except RedisError as exc:
        log.warning("could not record the Redis restart: %s", exc)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class StopRequested(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM so that ``with Stack(...)`` unwinds and stops all."""


def raise_on_stop_signals() -> None:
    """Make SIGINT and SIGTERM raise :class:`StopRequested` (install before starting anything)."""

    def handle(signum: int, frame: FrameType | None) -> None:
        raise StopRequested(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    _stop_signals.installed = True


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _descendants(children: Iterable[subprocess.Popen[bytes]]) -> list[psutil.Process]:
    """The processes our children started (pool children, Flower's), to make sure none outlives stop()."""
    found: list[psutil.Process] = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            found.extend(psutil.Process(child.pid).children(recursive=True))
    return found


def _ignore_stop_signals() -> None:
    if _stop_signals.installed:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
