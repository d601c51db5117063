"""Copilot: the coordinator. Beat schedules, health checks of every service, orchestration of the other roles."""

from __future__ import annotations

import logging
import time
from typing import Any

from xnai_tasks.core import constants as c
from xnai_tasks.worker.memory_bank import connection
from xnai_tasks.worker.role_task import RoleTask, register_diagnostics, role_task

ROLE = "copilot"
log = logging.getLogger(__name__)
PING_TIMEOUT_S = 1.0

register_diagnostics(ROLE)


@role_task(ROLE)
def check_services(self: RoleTask) -> dict[str, Any]:
    """Does Redis answer, and which workers answer ``ping`` per role (Celery beat runs it every minute)."""
    start = time.perf_counter()
    redis_error: str | None = None
    try:
        redis_ok = bool(connection().ping())
    except Exception as exc:  # any failure is the answer here, not an error of the check
        redis_ok, redis_error = False, f"{type(exc).__name__}: {exc}"
    online: dict[str, list[str]] = {role: [] for role in c.ROLES}
    for reply in self.app.control.ping(timeout=PING_TIMEOUT_S) or []:
        for node in reply:
            role = node.split("@", 1)[0]
            if role in online:
                online[role].append(node)
    missing = [role for role, nodes in online.items() if not nodes]
    decisions = _tend_resources(self, online) if redis_ok else []
    return {
        "redis": {"reachable": redis_ok, "error": redis_error},
        "workers": {role: sorted(nodes) for role, nodes in online.items()},
        "healthy": redis_ok and not missing,
        "missing_roles": missing,
        "decisions": decisions,
        "checked_at": time.time(),
        "timings": {"total_s": round(time.perf_counter() - start, 4)},
    }


def _tend_resources(self: RoleTask, online: dict[str, list[str]]) -> list[dict[str, Any]]:
    """RAM and queue pressure: unload idle models, warm scheduled ones (xnai_tasks/ops/resources.py)."""
    from xnai_tasks.ops.resources import tend
    from xnai_tasks.settings import process_settings

    try:
        return tend(self.app, connection(), process_settings(), online)
    except Exception as exc:  # the health check still answers; the next tick tries again
        log.warning("copilot resource check failed: %s: %s", type(exc).__name__, exc)
        return []


@role_task(ROLE)
def run_workflow(
    self: RoleTask,
    workflow: str,
    kwargs: dict[str, Any] | None = None,
    run_id: str | None = None,
    schedule: str | None = None,
) -> dict[str, Any]:
    """Run a workflow from the copilot worker (beat's XNAI_SCHEDULE entry ``schedule``, ``xnai run``); its record."""
    from xnai_tasks.client.sync import Client
    from xnai_tasks.ops.resources import mark_started
    from xnai_tasks.settings import process_settings
    from xnai_tasks.workflow.runner import run_workflow as run

    if schedule is not None:
        mark_started(connection(), schedule)
    client = Client(process_settings())
    try:
        return run(client, workflow, dict(kwargs or {}), run_id=run_id)
    finally:
        client.close()
