"""Hosts on one machine, each a Linux network namespace: a hub (the embedded Redis, the copilot) and worker hosts
that reach it over TCP through a bridge, as separate machines on a LAN would.

Layout: a switch namespace holds the bridge ``br0``; each host namespace has ``eth0`` (its end of a veth pair whose
other end, ``v-NAME``, is a port of the bridge) with an address of ``SUBNET.0/24``, and ``lo`` up. The root
namespace gets no address on the test network and no route to it, and every process that knows a test address
(workers, the TLS terminator, test clients) runs inside a namespace: nothing can follow the root's default route off the
machine, even a connection retried after teardown. Each host has its own ``XNAI_HOME`` and its own host name (a UTS
namespace per process tree), so its Celery nodes are ``ROLE@NAME``. Each process runs in a session of its own;
killing a host kills every process in its namespace, whoever started it.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from hosts.netns import (
    PREFIX,
    NetnsError,
    delete_namespace,
    ip,
    kill_namespace,
    list_namespaces,
    namespace_pids,
    sweep_stale,
    unavailable_reason,
)
from xnai_tasks.ops.proc import pid_alive

#: The test network: a private range nothing on this machine routes (checked by the tests against ``ip addr``).
SUBNET: Final = "10.231.0"
HUB_ADDRESS_SUFFIX: Final = 1
FIRST_HOST_SUFFIX: Final = 11
#: Port of the hub's Redis (its TLS terminator) on the test network.
HUB_PORT: Final = 6390
#: A port nothing listens on: a connection to it is refused (answered) whenever the path works.
CLOSED_PORT: Final = 9
TESTS_DIR: Final = Path(__file__).resolve().parent.parent
#: Where each cluster's folder (homes, logs) goes: a short path, as unix socket paths are limited to 107 bytes.
BASE_DIR: Final = "/tmp"
#: Settings every process of the cluster shares: lazy models (nothing loads unless a task needs it), no LLM probe.
BASE_ENV: Final = {"XNAI_MODEL_MODE": "lazy", "XNAI_LLM_SAFE": "off", "XNAI_LOG_LEVEL": "INFO"}
#: A role call for :meth:`Hub.submit_many`: role, task, keyword arguments.
Call = tuple[str, str, Mapping[str, Any]]
_RESERVED_NAMES: Final = ("sw", "probe")
_counter = itertools.count()


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be made on this machine; the message says why (for ``pytest.skip``)."""


class HarnessError(RuntimeError):
    """The cluster did not come up or a host did not do what it was asked; the message says what."""


@dataclass
class Proc:
    """One process the harness started inside a namespace, in its own session (its pid is its process group)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass(frozen=True)
class Outcome:
    """What one call of :meth:`Hub.submit_many` ended with."""

    index: int
    role: str
    task: str
    task_id: str | None
    ok: bool
    value: Any
    #: ``ErrorType: text`` when not ``ok``.
    error: str | None
    #: Seconds from the batch's start to this outcome.
    seconds: float

    @property
    def node(self) -> str | None:
        """The Celery node (``ROLE@HOST``) that ran it, when the task says (``where``, ``health``)."""
        if isinstance(self.value, dict):
            found = self.value.get("node") or self.value.get("hostname")
            return str(found) if found else None
        return None

    @property
    def host(self) -> str | None:
        """The host (the part after ``@`` of :attr:`node`) that ran it."""
        return self.node.partition("@")[2] if self.node else None


class Node:
    """A machine of the cluster: a network namespace with an address, a home and the processes started in it."""

    def __init__(self, cluster: Cluster, name: str, address: str, roles: Sequence[str], env: Mapping[str, str]) -> None:
        self.cluster = cluster
        self.name = name
        self.address = address
        self.roles = tuple(roles)
        self.namespace = f"{cluster.prefix}{name}"
        self.veth = f"v-{name}"
        self.home = cluster.base / name
        self.home.mkdir(mode=0o700)
        self.env = dict(env)
        self.procs: list[Proc] = []

    @property
    def node_names(self) -> list[str]:
        """The Celery node names of this host's role workers."""
        return [f"{role}@{self.name}" for role in self.roles]

    # ---- processes ----

    def child_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a process of this host: no ``XNAI_*`` of the test process, this host's home."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XNAI_", "PROMETHEUS_MULTIPROC_DIR"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(TESTS_DIR), os.environ.get("PYTHONPATH"))))
        env.update(BASE_ENV)
        env["XNAI_TASK_MODULES"] = ",".join(self.cluster.task_modules)
        env["XNAI_HOME"] = str(self.home)
        env.update(self.cluster.env)
        env.update(self.env)
        env.update(extra or {})
        return env

    def ns_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's network namespace, under its own host name."""
        set_name = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "--", "sh", "-c", set_name, self.name,
                *argv]  # fmt: skip

    def spawn(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, pipe_stdio: bool = False
    ) -> Proc:
        """Start ``argv`` inside the namespace in a session of its own; its output goes to ``logs/HOST-NAME.out``
        (only stderr there with ``pipe_stdio``: stdin and stdout are then pipes)."""
        self.cluster.logs.mkdir(mode=0o700, exist_ok=True)
        log = self.cluster.logs / f"{self.name}-{name}.out"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                self.ns_argv(argv),
                env=self.child_env(env),
                stdin=subprocess.PIPE if pipe_stdio else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdio else out,
                stderr=out,
                start_new_session=True,
                cwd=str(self.home),
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 120.0, input: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace to its end (killed with its session at ``timeout``)."""
        popen = subprocess.Popen(
            self.ns_argv(argv),
            env=self.child_env(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            cwd=str(self.home),
        )
        try:
            out, err = popen.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise HarnessError(f"{self.name}: {' '.join(argv)} did not end within {timeout:.0f} s") from None
        return subprocess.CompletedProcess(list(argv), popen.returncode, out, err)

    def xnai(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """``xnai ARGS`` on this host (its home, inside its namespace)."""
        return self.run([sys.executable, "-m", "xnai_tasks", *args], env=env, timeout=timeout)

    def python(self, code: str, *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``python -c CODE`` on this host."""
        return self.run([sys.executable, "-c", code], timeout=timeout)

    def pids(self) -> list[int]:
        """Every process in this host's namespace (started by the harness or by one of them)."""
        return namespace_pids(self.namespace)

    def running(self) -> list[Proc]:
        """The harness's processes of this host still running."""
        return [proc for proc in self.procs if proc.alive()]

    def kill_all(self) -> list[int]:
        """SIGKILL every process of this host at once (a power cut); the pids killed. Nothing is told first."""
        for proc in self.procs:
            if proc.alive():
                _killpg(proc.pid, signal.SIGKILL)
        killed = kill_namespace(self.namespace, reap=self._poll)  # every other process in it, whoever started it
        self._reap()
        return killed

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM each process group the harness started here, then :meth:`kill_all` what is left after
        ``grace_s``."""
        live = self.running()
        for proc in live:
            _killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.kill_all()

    def _poll(self) -> None:
        for proc in self.procs:
            proc.popen.poll()  # reaps a child that died

    def _reap(self) -> None:
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=5)
            if proc.popen.stdin is not None:
                proc.popen.stdin.close()
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()

    # ---- the link ----

    def cut_link(self) -> None:
        """Pull this host's cable: its bridge port goes down, so every packet to or from it is dropped (TCP
        connections are not reset; they time out or resume when the link is back)."""
        ip("-n", self.cluster.switch, "link", "set", self.veth, "down")

    def restore_link(self, *, wait_s: float = 30.0) -> None:
        """Plug the cable back in; return once this host gets an answer from a peer again (the hub; the hub asks its
        first host), or :class:`HarnessError` after ``wait_s``. Neighbour (ARP) entries that failed meanwhile are
        flushed on both sides, as a switch port coming up makes real hosts resolve again at once."""
        ip("-n", self.cluster.switch, "link", "set", self.veth, "up")
        peers = [node for node in self.cluster.nodes if node is not self]
        for node in (self, *peers):
            ip("-n", node.namespace, "neigh", "flush", "dev", "eth0")
        if not peers:
            return
        deadline = time.monotonic() + wait_s
        while not self.reaches(peers[0].address, timeout=1.0):
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.name} gets no answer from {peers[0].name} {wait_s:.0f} s after its link is back"
                )

    @property
    def link_up(self) -> bool:
        """Whether this host's bridge port is up (see :meth:`cut_link`)."""
        shown = ip("-n", self.cluster.switch, "link", "show", self.veth)
        return "UP" in shown.partition("<")[2].partition(">")[0].split(",")

    def reaches(self, address: str, timeout: float = 2.0) -> bool:
        """Whether this host gets an answer from ``address`` within ``timeout``: a TCP connection to a port nobody
        listens on is refused at once (a reset) when the path works, and times out (or finds no route) when not."""
        code = (
            "import socket,sys\n"
            f"try: socket.create_connection(({address!r}, {CLOSED_PORT}), timeout={timeout}).close()\n"
            "except ConnectionRefusedError: pass\n"
            "except OSError: sys.exit(1)\n"
        )
        return self.python(code, timeout=timeout + 30).returncode == 0

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of each process's output, for a failure report."""
        parts = []
        for proc in self.procs:
            try:
                text = proc.log.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"---- {self.name}/{proc.name} (pid {proc.pid}, rc {proc.popen.poll()}) ----")
            parts.extend(text)
        return "\n".join(parts)


class Host(Node):
    """A worker host: joined to the hub with a bundle of its roles (``xnai host join``), one ``xnai worker ROLE``
    per role, each connecting to the hub's Redis over mutual TLS with its own role's credential."""

    def __init__(
        self, cluster: Cluster, name: str, address: str, roles: Sequence[str], env: Mapping[str, str], concurrency: int
    ) -> None:
        super().__init__(cluster, name, address, roles, env)
        self.concurrency = concurrency
        self.bundle: Path | None = None

    def provision(self) -> None:
        """Join the hub: the hub makes this host's bundle (its roles' credentials and keys, the keyring, the CA and a
        client certificate named after the host), it is carried over, and this host joins with it."""
        hub = self.cluster.require_hub()
        made = hub.home / "bundles" / f"{self.name}.json"
        made.parent.mkdir(mode=0o700, exist_ok=True)
        _check(hub, hub.xnai("host", "bundle", *self.roles, "--url", hub.url, "-o", str(made), "--host", self.name))
        self.bundle = self.home / "bundle.json"
        shutil.copy2(made, self.bundle)
        _check(self, self.xnai("host", "join", str(self.bundle)))

    def start(self, *, wait: bool = True, timeout: float = 120.0) -> None:
        """Start one worker per role (``--concurrency`` pool processes each), joining the hub first if this host has
        not yet; with ``wait``, return once the hub sees every one of them answer a ping."""
        hub = self.cluster.require_hub()
        if self.running():
            raise HarnessError(f"host {self.name} is already running: {[p.name for p in self.running()]}")
        if self.bundle is None:
            self.provision()
        for role in self.roles:
            self.spawn(
                role, [sys.executable, "-m", "xnai_tasks", "worker", role, "--concurrency", str(self.concurrency)]
            )
        if wait:
            hub.wait_online(self.node_names, timeout=timeout)


class Hub(Node):
    """The hub: ``xnai up`` with the embedded Redis (and the copilot unless ``roles`` is empty; else ``xnai redis``)
    and its TLS terminator on ``ADDRESS:HUB_PORT``, with a private CA whose server certificate names ``ADDRESS``."""

    port = HUB_PORT

    @property
    def url(self) -> str:
        """The hub's Redis as the other hosts reach it, without credentials (a bundle adds each role's)."""
        return f"rediss://{self.address}:{self.port}/0"

    def child_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        tls = {"XNAI_REDIS_TLS_PORT": str(self.port), "XNAI_REDIS_TLS_BIND": self.address}
        return super().child_env({**tls, **(extra or {})})

    def start(self, *, timeout: float = 60.0) -> None:
        """Make the CA and the server certificate, start the hub's stack; return once its TLS terminator completes a
        handshake with the hub's own client certificate."""
        _check(self, self.xnai("tls", "init", "--host", self.address))
        if self.roles:
            self.spawn("up", [sys.executable, "-m", "xnai_tasks", "up", "--roles", ",".join(self.roles), "--no-flower"])
        else:  # `xnai redis` makes no keys (`xnai up` does)
            _check(self, self.xnai("keys", "init"))
            self.spawn("redis", [sys.executable, "-m", "xnai_tasks", "redis"])
        argv = [sys.executable, "-m", "hosts.client", "tls-ready", self.address, str(self.port)]
        ready = self.run([*argv, "--timeout", str(timeout)], timeout=timeout + 30)
        if ready.returncode != 0:
            raise HarnessError(f"the hub's TLS terminator is not ready: {ready.stderr.strip()}\n{self.log_tails()}")

    def online(
        self, *, want: Iterable[str] = (), gone: Iterable[str] = (), timeout: float = 1.0
    ) -> tuple[bool, list[str]]:
        """Ask from the hub which nodes answer a signed ping, waiting up to ``timeout`` for every node of ``want`` to
        answer and none of ``gone``; (whether that came true, the nodes answering)."""
        argv = [sys.executable, "-m", "hosts.client", "online", "--want", ",".join(want), "--gone", ",".join(gone)]
        done = self.run([*argv, "--timeout", str(timeout)], timeout=timeout + 60)
        lines = done.stdout.strip().splitlines()
        if not lines:
            raise HarnessError(f"the hub's ping client said nothing (rc {done.returncode}): {done.stderr.strip()}")
        answer = json.loads(lines[-1])
        return bool(answer["ok"]), list(answer["online"])

    def wait_online(self, nodes: Iterable[str], timeout: float = 120.0) -> list[str]:
        """Wait until every node of ``nodes`` answers a ping from the hub; the nodes answering."""
        wanted = list(nodes)
        ok, seen = self.online(want=wanted, timeout=timeout)
        if not ok:
            missing = sorted(set(wanted) - set(seen))
            raise HarnessError(f"no answer from {missing} within {timeout:.0f} s\n{self.cluster.log_tails()}")
        return seen

    def wait_gone(self, nodes: Iterable[str], timeout: float = 60.0) -> list[str]:
        """Wait until none of ``nodes`` answers a ping from the hub; the nodes still answering."""
        unwanted = list(nodes)
        ok, seen = self.online(gone=unwanted, timeout=timeout)
        if not ok:
            raise HarnessError(f"{sorted(set(unwanted) & set(seen))} still answer after {timeout:.0f} s")
        return seen

    def submit_many(self, calls: Iterable[Call], *, timeout: float = 120.0, max_in_flight: int = 64) -> Batch:
        """Submit ``calls`` from a client process in the hub's namespace, at most ``max_in_flight`` out at once;
        returns at once. Each call ends as an :class:`Outcome` within ``timeout`` seconds of the start."""
        listed = [(role, task, dict(kwargs)) for role, task, kwargs in calls]
        job = {"calls": listed, "timeout": timeout, "max_in_flight": max_in_flight}
        proc = self.spawn(f"client{next(_counter)}", [sys.executable, "-m", "hosts.client", "submit"], pipe_stdio=True)
        return Batch(proc, listed, json.dumps(job), timeout)


class Batch:
    """Calls submitted by one client process in the hub's namespace; their outcomes as they arrive."""

    def __init__(self, proc: Proc, calls: list[tuple[str, str, dict[str, Any]]], job: str, timeout: float) -> None:
        self.proc = proc
        self.calls = calls
        self.timeout = timeout
        self.task_ids: dict[int, str] = {}
        #: When each outcome reached the test process (``time.monotonic()``): failover times are measured on it.
        self.arrived: dict[int, float] = {}
        self._outcomes: dict[int, Outcome] = {}
        self._done = False
        self._changed = threading.Condition()
        assert proc.popen.stdin is not None and proc.popen.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(proc.popen.stdout,), daemon=True)
        self._reader.start()
        try:
            proc.popen.stdin.write(job.encode())
            proc.popen.stdin.close()
        except BrokenPipeError:
            pass  # the client died at start: wait() says so

    @property
    def total(self) -> int:
        return len(self.calls)

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            with self._changed:
                if event.get("event") == "submitted":
                    self.task_ids[event["i"]] = event["id"]
                elif event.get("event") == "result":
                    self.arrived[event["i"]] = time.monotonic()
                    role, task, _ = self.calls[event["i"]]
                    self._outcomes[event["i"]] = Outcome(
                        event["i"], role, task, event.get("id"), bool(event["ok"]), event.get("value"),
                        event.get("error"), float(event.get("seconds", 0.0)),
                    )  # fmt: skip
                elif event.get("event") == "done":
                    self._done = True
                self._changed.notify_all()
        with self._changed:
            self._done = True  # the client ended (or was killed): nothing more will come
            self._changed.notify_all()

    def outcomes(self) -> list[Outcome]:
        """The outcomes so far, in call order."""
        with self._changed:
            return [self._outcomes[i] for i in sorted(self._outcomes)]

    def wait_for(self, count: int, timeout: float | None = None) -> list[Outcome]:
        """Block until at least ``count`` calls have ended (or the client ended); the outcomes so far."""
        deadline = time.monotonic() + (self.timeout + 60 if timeout is None else timeout)
        with self._changed:
            while len(self._outcomes) < count and not self._done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HarnessError(f"only {len(self._outcomes)} of {count} outcomes in time")
                self._changed.wait(left)
        return self.outcomes()

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Every call's outcome, in call order, once the client is done; :class:`HarnessError` when it ended
        without answering for some (its output says why)."""
        self.wait_for(self.total, timeout)
        self._reader.join(timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.popen.wait(timeout=10)
        found = self.outcomes()
        if len(found) < self.total:
            tail = self.proc.log.read_text(errors="replace").splitlines()[-15:]
            raise HarnessError(f"the client ended with {len(found)} of {self.total} outcomes:\n" + "\n".join(tail))
        return found


class Cluster:
    """Namespaced hosts on this machine; use as a context manager (or call :meth:`teardown`, also run at exit).

    ``add_hub`` and ``add_host`` make a host's namespace and wire it to the switch; :meth:`start` starts the hub, then
    every host at once, and waits until every role worker answers the hub's ping.
    """

    def __init__(
        self,
        *,
        subnet: str = SUBNET,
        task_modules: Sequence[str] = ("hosts.node_tasks",),
        env: Mapping[str, str] | None = None,
    ) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise NamespacesUnavailable(reason)
        self.swept = sweep_stale() + _sweep_stale_bases()
        self.subnet = subnet
        self.task_modules = tuple(task_modules)
        #: ``XNAI_*`` settings of every process of every host (a host's own ``env`` wins), e.g. XNAI_DEAD_AFTER.
        self.env = dict(env or {})
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_counter)}-"
        self.base = Path(tempfile.mkdtemp(prefix=f"xnai-h{os.getpid()}-", dir=BASE_DIR))
        self.logs = self.base / "logs"
        self.switch = f"{self.prefix}sw"
        self.hub: Hub | None = None
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []
        self._torn_down = False
        atexit.register(self.teardown)
        try:
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
            ip("-n", self.switch, "link", "set", "lo", "up")
        except BaseException:
            self.teardown()
            raise

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    @property
    def nodes(self) -> list[Node]:
        """The hub (if any), then every host."""
        return ([self.hub] if self.hub is not None else []) + list(self.hosts.values())

    def require_hub(self) -> Hub:
        if self.hub is None:
            raise HarnessError("the cluster has no hub: call add_hub first")
        return self.hub

    def add_hub(self, roles: Sequence[str] = ("copilot",), *, env: Mapping[str, str] | None = None) -> Hub:
        """The hub's namespace (``SUBNET.1``): it will run the embedded Redis and ``roles`` (the copilot)."""
        if self.hub is not None:
            raise HarnessError("the cluster has a hub already")
        self.hub = Hub(self, "hub", f"{self.subnet}.{HUB_ADDRESS_SUFFIX}", roles, env or {})
        self._wire(self.hub)
        return self.hub

    def add_host(
        self, name: str, roles: Sequence[str], *, concurrency: int = 1, env: Mapping[str, str] | None = None
    ) -> Host:
        """A worker host ``name`` (lower-case letters and digits, at most 12) running one worker per role."""
        if not (name.isalnum() and name.islower() and len(name) <= 12) or name in (*_RESERVED_NAMES, "hub"):
            raise HarnessError(f"bad host name {name!r}: lower-case letters and digits, at most 12, not hub/sw/probe")
        if name in self.hosts:
            raise HarnessError(f"host {name!r} exists already")
        address = f"{self.subnet}.{FIRST_HOST_SUFFIX + len(self.hosts)}"
        host = Host(self, name, address, roles, env or {}, concurrency)
        self.hosts[name] = host
        self._wire(host)
        return host

    def _add_namespace(self, namespace: str) -> None:
        ip("netns", "add", namespace)
        self._made.append(namespace)

    def _wire(self, node: Node) -> None:
        """The node's namespace, its veth pair to the bridge, its address; both ends and ``lo`` up."""
        self._add_namespace(node.namespace)
        ip("-n", self.switch, "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.namespace)
        ip("-n", self.switch, "link", "set", node.veth, "master", "br0", "up")
        ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", "eth0")
        ip("-n", node.namespace, "link", "set", "eth0", "up")
        ip("-n", node.namespace, "link", "set", "lo", "up")

    def start(self, timeout: float = 150.0) -> None:
        """Start the hub, then every host at once; return when every role worker answers the hub's ping."""
        hub = self.require_hub()
        hub.start()
        with ThreadPoolExecutor(max_workers=max(1, len(self.hosts))) as pool:  # each host joins and starts at once
            for started in [pool.submit(host.start, wait=False) for host in self.hosts.values()]:
                started.result()
        hub.wait_online([name for node in self.nodes for name in node.node_names], timeout=timeout)

    def namespaces(self) -> list[str]:
        """This cluster's namespaces that exist now."""
        return [name for name in list_namespaces() if name.startswith(self.prefix)]

    def log_tails(self, lines: int = 25) -> str:
        return "\n".join(node.log_tails(lines) for node in self.nodes)

    def teardown(self) -> None:
        """Kill every process, delete every namespace (veths and bridge go with them) and the homes. Idempotent;
        every step is tried even when one fails, and the first failure is raised at the end."""
        if self._torn_down:
            return
        self._torn_down = True
        atexit.unregister(self.teardown)
        failures: list[BaseException] = []
        for node in reversed(self.nodes):  # the hosts first: none of them tries to reach a hub that is gone
            try:
                node.kill_all()
            except (NetnsError, OSError, subprocess.SubprocessError) as exc:
                failures.append(exc)
        for namespace in reversed(self._made):
            try:
                delete_namespace(namespace)
            except (NetnsError, OSError, subprocess.SubprocessError) as exc:
                failures.append(exc)
        shutil.rmtree(self.base, ignore_errors=True)
        if failures:
            raise HarnessError(f"teardown: {failures[0]}") from failures[0]


def _sweep_stale_bases() -> list[str]:
    """Delete the ``/tmp/xnai-hPID-*`` folders (homes, logs) of runs whose PID no longer runs; their paths."""
    swept = []
    for folder in Path(BASE_DIR).glob("xnai-h*-*"):
        pid = folder.name[len("xnai-h") :].partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(str(folder))
    return swept


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _check(node: Node, done: subprocess.CompletedProcess[str]) -> None:
    """Raise :class:`HarnessError` with its error output when a command run on ``node`` failed."""
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise HarnessError(
            f"{node.name}: {' '.join(done.args[-6:])}: exit {done.returncode}: {said[-1] if said else ''}"
        )
