"""Copilot: the coordinator. Beat schedules, health checks of every service, orchestration of the other roles."""

from __future__ import annotations

import time
from typing import Any

from xnai_tasks.core import constants as c
from xnai_tasks.worker.memory_bank import connection
from xnai_tasks.worker.role_task import RoleTask, register_diagnostics, role_task

ROLE = "copilot"
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
    return {
        "redis": {"reachable": redis_ok, "error": redis_error},
        "workers": {role: sorted(nodes) for role, nodes in online.items()},
        "healthy": redis_ok and not missing,
        "missing_roles": missing,
        "checked_at": time.time(),
        "timings": {"total_s": round(time.perf_counter() - start, 4)},
    }


@role_task(ROLE)
def run_workflow(
    self: RoleTask, workflow: str, kwargs: dict[str, Any] | None = None, run_id: str | None = None
) -> dict[str, Any]:
    """Run a workflow from the copilot worker (beat's XNAI_SCHEDULE, ``xnai run``); its record (state, steps)."""
    from xnai_tasks.client.sync import Client
    from xnai_tasks.settings import process_settings
    from xnai_tasks.workflow.runner import run_workflow as run

    client = Client(process_settings())
    try:
        return run(client, workflow, dict(kwargs or {}), run_id=run_id)
    finally:
        client.close()
