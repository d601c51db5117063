"""``xnai status``: is Redis reachable, which workers are online per role, how deep is each queue."""

from __future__ import annotations

import json
from typing import Any

import redis

from xnai_tasks import acl, broker
from xnai_tasks import constants as c
from xnai_tasks.settings import Settings


def collect_status(settings: Settings) -> dict[str, Any]:
    """Status as a JSON-ready dict; raises BrokerUnreachableError when Redis does not answer."""
    from xnai_tasks.celery_app import create_app
    from xnai_tasks.supervisor import workers_online

    broker.require_reachable(settings)
    conn = broker.connect(acl.connection_url(settings, acl.ADMIN))
    app = create_app(settings, main="xnai_status")
    try:
        online = workers_online(app, timeout=1.0)
        roles = {
            role: {
                "workers": sorted(online.get(role, [])),
                "queued": broker.queue_depth(conn, c.queue_for(role)),
                "refused": refusal_counts(conn, role),
                "dead_letters": int(conn.llen(c.dead_letter_key(role))),
            }
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
    lines = [f"redis: reachable ({kind}) {redis['url']}", f"{'role':10}{'queued':>8}{'refused':>9}  workers"]
    for role, info in status["roles"].items():
        workers = ", ".join(info["workers"]) or "-"
        lines.append(f"{role:10}{info['queued']:>8}{sum(info['refused'].values()):>9}  {workers}")
    for role, info in status["roles"].items():
        if info["refused"]:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(info["refused"].items()))
            lines.append(
                f"refused by {role}: {reasons} ({info['dead_letters']} kept: xnai status --dead-letters {role})"
            )
    return "\n".join(lines)


def refusal_counts(conn: redis.Redis, role: str) -> dict[str, int]:
    """Refused messages of a role, per reason."""
    raw = conn.hgetall(c.refused_counter_key(role))
    return {(key.decode() if isinstance(key, bytes) else key): int(value) for key, value in raw.items()}


def dead_letters(settings: Settings, role: str, limit: int = 20) -> list[dict[str, Any]]:
    """The newest refused raw messages of a role, as kept by the gate."""
    broker.require_reachable(settings)
    conn = broker.connect(acl.connection_url(settings, acl.ADMIN))
    try:
        return [json.loads(raw) for raw in conn.lrange(c.dead_letter_key(role), 0, limit - 1)]
    finally:
        conn.close()
