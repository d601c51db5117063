"""Child processes that cannot outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for Popen: the kernel sends SIGTERM to the child when its parent dies.

    ``xnai up`` stops its children itself on SIGINT/SIGTERM; this covers the case it cannot see,
    a SIGKILL or a crash, so no worker, Flower or Redis is left orphaned.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
