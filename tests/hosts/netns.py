"""Linux network namespaces through the ``ip`` command: make, wire, list, empty and delete them.

Every namespace the harness makes is named ``xnai-PID-...`` after the process that made it, so a run killed before
its teardown (SIGKILL, a crash) is cleaned up by the next one (:func:`sweep_stale`), and two runs never touch each
other's namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Final

from xnai_tasks.ops.proc import pid_alive

PREFIX: Final = "xnai-"
_OURS: Final = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
#: A process killed by SIGKILL is gone at once; its namespace empties as soon as every process in it is reaped.
EMPTY_WAIT_S: Final = 10.0


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message is the command and what it said."""


def ip(*args: str, timeout: float = 30.0) -> str:
    """Run ``ip ARGS``; its output, or :class:`NetnsError` naming the command and its error."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise NetnsError(f"ip {' '.join(args)}: {said[-1] if said else f'exit {done.returncode}'}")
    return done.stdout


def unavailable_reason(probe_name: str | None = None) -> str | None:
    """Why namespaces cannot be made here (one line), or None when they can: root, ``ip`` and ``unshare``
    present, and a probe namespace made and deleted."""
    if os.geteuid() != 0:
        return "not root: making network namespaces needs CAP_SYS_ADMIN (run the tests as root)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command on PATH (iproute2 / util-linux / hostname)"
    name = probe_name or f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", name)
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot make a network namespace: {exc}"
    try:
        ip("netns", "delete", name)
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"made a network namespace but cannot delete it: {exc}"
    return None


def list_namespaces() -> list[str]:
    """Names of every named network namespace (``ip netns list``)."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def namespace_pids(namespace: str) -> list[int]:
    """Pids of every process in ``namespace`` (none when it does not exist)."""
    try:
        out = ip("netns", "pids", namespace)
    except NetnsError:
        return []
    return [int(word) for word in out.split() if word.isdigit()]


def kill_namespace(
    namespace: str, *, wait_s: float = EMPTY_WAIT_S, reap: Callable[[], None] | None = None
) -> list[int]:
    """SIGKILL every process in ``namespace`` until none is left (a dying Celery parent may still fork); the pids
    killed. ``reap`` is called between rounds: our own children must be reaped for the namespace to empty."""
    killed: list[int] = []
    deadline = time.monotonic() + wait_s
    while pids := namespace_pids(namespace):
        if reap is not None:
            reap()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            if pid not in killed:
                killed.append(pid)
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {pids} in {namespace} survive SIGKILL after {wait_s:.0f} s")
        time.sleep(0.05)
    return killed


def delete_namespace(namespace: str) -> None:
    """Kill what runs in ``namespace`` and delete it (its veth ends and bridge go with it); absent is fine."""
    if namespace not in list_namespaces():
        return
    kill_namespace(namespace)
    ip("netns", "delete", namespace)


def owner_pid(namespace: str) -> int | None:
    """The pid a harness namespace is named after, or None for a namespace that is not ours."""
    found = _OURS.match(namespace)
    return int(found.group(1)) if found else None


def sweep_stale() -> list[str]:
    """Delete every ``xnai-PID-*`` namespace whose PID no longer runs (left by a killed run); the names deleted."""
    swept = []
    for namespace in list_namespaces():
        pid = owner_pid(namespace)
        if pid is None or pid_alive(pid):
            continue
        delete_namespace(namespace)
        swept.append(namespace)
    return swept
