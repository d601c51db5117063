"""Processes: children that cannot outlive the process that started them; whether a pid still runs."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for Popen: the kernel sends SIGTERM to the child when its parent dies.

    ``xnai up`` stops its children itself on SIGINT/SIGTERM; this covers the case it cannot see,
    a SIGKILL or a crash, so no worker, Flower or Redis is left orphaned.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one owned by another user counts; a zombie too, until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
