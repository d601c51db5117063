"""The copilot's model swapping on a worker: unload idle lazy models on request, warm them before a workflow.

Lazy models live in the prefork children, but Celery's remote control reaches only the worker's parent.
So the unload is the signed control command :data:`RELEASE_COMMAND` (a ``control`` command: the gate in
:mod:`xnai_tasks.security.control` runs it only when the copilot signed it); the parent passes it on to
each pool child with :data:`RELEASE_SIGNAL`, and each child unloads the lazy models no task is using.
Warming is the role task ``ROLE.warm_models`` (one pool child loads the role's lazy models).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from types import FrameType
from typing import Any

from xnai_tasks.errors import XnaiError

log = logging.getLogger(__name__)

RELEASE_COMMAND = "xnai_release_models"
#: SIGURG: ignored by default, so a child that never installed the handler (or any other child) is unharmed.
RELEASE_SIGNAL = signal.SIGURG


def register_release_command() -> None:
    """Add :data:`RELEASE_COMMAND` to Celery's control panel (a ``control`` command: copilot only)."""
    from celery.worker.control import Panel

    Panel.register(type="control", name=RELEASE_COMMAND, default_timeout=2.0)(_release_command)


def _release_command(state: Any, **_: Any) -> dict[str, Any]:
    """Ask every pool child to unload its idle lazy models (and unload this process's own)."""
    import psutil

    children = psutil.Process().children()
    for child in children:
        try:
            os.kill(child.pid, RELEASE_SIGNAL)
        except OSError:  # a child that just exited
            continue
    released = release_idle()
    return {"ok": f"asked {len(children)} pool processes to unload idle lazy models", "released": released}


def install_release_handler(**_: Any) -> None:
    """In a pool child (``worker_process_init``): unload idle lazy models when the parent passes a release on."""
    signal.signal(RELEASE_SIGNAL, _on_release_signal)


def _on_release_signal(signum: int, frame: FrameType | None) -> None:
    # a thread, not the handler: the handler may interrupt a task that holds a model's lock
    threading.Thread(target=release_idle, name="xnai-release-models", daemon=True).start()


def release_idle() -> list[str]:
    """Unload this process's lazy models that no task is using now; the names of those unloaded."""
    from xnai_tasks.worker import startup

    role = startup.current_registry_role()
    if role is None:
        return []
    released = []
    for holder in startup.registry(role).holders():
        if holder.mode == "lazy" and holder.unload_if_idle(now=math.inf):
            released.append(holder.model.name)
    if released:
        log.info(
            "%s: unloaded idle models %s (asked by the copilot)",
            role,
            ", ".join(released),
            extra={"event": "models_released", "role": role},
        )
    return released


def warm(role: str) -> list[dict[str, Any]]:
    """Load the role's lazy models in this process (a load that does not fit is reported, not raised)."""
    from xnai_tasks.worker import startup

    for holder in startup.registry(role).holders():
        if holder.mode != "lazy" or holder.loaded:
            continue
        try:
            holder.load()
        except XnaiError as exc:
            log.warning("%s: could not warm %s: %s", role, holder.model.name, exc)
    return startup.describe(role)
