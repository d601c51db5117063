"""``xnai status``: is Redis reachable, which workers are online per role, how deep is each queue."""

from __future__ import annotations

from typing import Any

from xnai_tasks import broker
from xnai_tasks import constants as c
from xnai_tasks.settings import Settings


def collect_status(settings: Settings) -> dict[str, Any]:
    """Status as a JSON-ready dict; raises BrokerUnreachableError when Redis does not answer."""
    from xnai_tasks.celery_app import create_app
    from xnai_tasks.supervisor import workers_online

    broker.require_reachable(settings)
    conn = broker.connect(settings.broker_url)
    app = create_app(settings, main="xnai_status")
    try:
        online = workers_online(app, timeout=1.0)
        roles = {
            role: {"workers": sorted(online.get(role, [])), "queued": broker.queue_depth(conn, c.queue_for(role))}
            for role in c.ROLES
        }
    finally:
        conn.close()
        app.close()
    return {
        "redis": {"url": broker.redact(settings.broker_url), "embedded": settings.embedded, "reachable": True},
        "roles": roles,
    }


def format_status(status: dict[str, Any]) -> str:
    """A short table for people."""
    redis = status["redis"]
    kind = "embedded" if redis["embedded"] else "external"
    lines = [f"redis: reachable ({kind}) {redis['url']}", f"{'role':10}{'queued':>8}  workers"]
    for role, info in status["roles"].items():
        workers = ", ".join(info["workers"]) or "-"
        lines.append(f"{role:10}{info['queued']:>8}  {workers}")
    return "\n".join(lines)
