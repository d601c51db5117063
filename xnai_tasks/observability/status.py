"""``xnai status``: is Redis reachable, which workers are online per role, how deep is each queue."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.ops.memory_guard import current_locks
from xnai_tasks.ops.resources import recent_decisions
from xnai_tasks.security import acl, redis_urls
from xnai_tasks.settings import Settings


def collect_status(settings: Settings) -> dict[str, Any]:
    """Status as a JSON-ready dict; raises BrokerUnreachableError when Redis does not answer."""
    from xnai_tasks.core.celery_app import create_app
    from xnai_tasks.core.nodes import workers_online

    broker.require_reachable(settings)
    conn = broker.connect(redis_urls.connection_url(settings, acl.ADMIN))
    app = create_app(settings, main="xnai_status")
    try:
        online = workers_online(app, timeout=1.0)
        roles = {
            role: {
                "workers": sorted(online.get(role, [])),
                "queued": broker.queue_depth(conn, c.queue_for(role)),
                "refused": refusal_counts(conn, role),
                "dead_letters": int(conn.llen(c.dead_letter_key(role))),
                "deaths": recent_deaths(conn, role),
                "models": model_verdicts(conn, role),
            }
            for role in c.ROLES
        }
        locks = current_locks(conn)
        for role, reason in locks.items():
            if role in roles:
                roles[role]["locked"] = reason
        restarts = recent_redis_restarts(conn)
        reliability = reliability_status(conn)
        copilot = {"decisions": recent_decisions(conn)}
    finally:
        conn.close()
        app.close()
    return {
        "redis": {
            "url": broker.redact(settings.broker_url),
            "embedded": settings.embedded,
            "reachable": True,
            "restarts": restarts,
        },
        "roles": roles,
        "copilot": copilot,
        **reliability,
    }


def reliability_status(conn: redis.Redis) -> dict[str, Any]:
    """Every circuit breaker (state, failures, opens, reason) and the model leases held now, per host."""
    from xnai_tasks.resilience.breaker import all_states
    from xnai_tasks.resilience.pool import leases_in_use

    return {"breakers": [s.as_dict() for s in all_states(conn)], "pools": leases_in_use(conn)}


def _reliability_lines(status: dict[str, Any]) -> list[str]:
    lines = []
    for b in status.get("breakers", []):
        if b["state"] == "open":
            lines.append(
                f"breaker {b['role']} {b['model']}: OPEN, next probe in ~{b['retry_in_s']:.0f} s: {b['reason']}"
            )
        elif b["state"] == "half_open":
            lines.append(f"breaker {b['role']} {b['model']}: HALF-OPEN, the next call probes: {b['reason']}")
        else:
            lines.append(f"breaker {b['role']} {b['model']}: closed ({b['failures']} recent failures)")
    for p in status.get("pools", []):
        lines.append(f"model leases {p['role']} {p['model']} on {p['host']}: {p['leases']} held")
    return lines


def format_status(status: dict[str, Any]) -> str:
    """A short table for people."""
    redis = status["redis"]
    kind = "embedded" if redis["embedded"] else "external"
    lines = [f"redis: reachable ({kind}) {redis['url']}"]
    restarts = redis.get("restarts", {})
    if restarts.get("last_10m"):
        last = restarts["recent"][0]
        when = time.strftime("%H:%M:%S", time.localtime(last["ts"]))
        lines.append(
            f"redis restarted by xnai up {restarts['last_10m']} time(s) in the last 10 min "
            f"(last {when}: {last['cause']})"
        )
    lines.append(f"{'role':10}{'queued':>8}{'refused':>9}  workers")
    for role, info in status["roles"].items():
        workers = ", ".join(info["workers"]) or "-"
        lines.append(f"{role:10}{info['queued']:>8}{sum(info['refused'].values()):>9}  {workers}")
    lines += _lock_lines(status)
    lines += _reliability_lines(status)
    lines += _decision_lines(status)
    for role, info in status["roles"].items():
        if info["refused"]:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(info["refused"].items()))
            lines.append(
                f"refused by {role}: {reasons} ({info['dead_letters']} kept: xnai status --dead-letters {role})"
            )
    for role, info in status["roles"].items():
        deaths = info.get("deaths", {})
        if deaths.get("last_10m"):
            causes = ", ".join(f"{cause} {n}" for cause, n in sorted(deaths["by_cause"].items()))
            lines.append(f"worker deaths of {role} in the last 10 min: {deaths['last_10m']} ({causes})")
    for role, info in status["roles"].items():
        for name, model in info.get("models", {}).items():
            line = _model_line(role, name, model)
            if line is not None:
                lines.append(line)
    return "\n".join(lines)


def _decision_lines(status: dict[str, Any], limit: int = 5) -> list[str]:
    """The copilot's newest resource decisions (xnai_tasks/ops/resources.py), one line each."""
    lines = []
    for d in status.get("copilot", {}).get("decisions", [])[:limit]:
        when = time.strftime("%H:%M:%S", time.localtime(d["at"]))
        lines.append(f"copilot {when} {d['action']} {','.join(d['roles'])}: {d['reason']} ({d['detail']})")
    return lines


def _lock_lines(status: dict[str, Any]) -> list[str]:
    return [
        f"{role} is locked out of Redis by the memory guard: {info['locked']} (xnai acl unlock {role})"
        for role, info in status["roles"].items()
        if info.get("locked")
    ]


#: ``xnai status`` counts worker-process deaths over this window.
DEATH_WINDOW_S = 600


def recent_redis_restarts(conn: redis.Redis, now: float | None = None) -> dict[str, Any]:
    """Restarts of the embedded Redis by ``xnai up`` in the last :data:`DEATH_WINDOW_S` seconds."""
    events = _recent_events(conn, c.redis_restarts_key(), c.REDIS_RESTARTS_MAX, now)
    return {"last_10m": len(events), "recent": events[:5]}


def _recent_events(conn: redis.Redis, key: str, most: int, now: float | None) -> list[dict[str, Any]]:
    """The JSON events of the list ``key`` (newest first) from the last :data:`DEATH_WINDOW_S` seconds."""
    since = (time.time() if now is None else now) - DEATH_WINDOW_S
    events = []
    for raw in conn.lrange(key, 0, most - 1):
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and float(event.get("ts", 0)) >= since:
            events.append(event)
    return events


def recent_deaths(conn: redis.Redis, role: str, now: float | None = None) -> dict[str, Any]:
    """The role's worker-process deaths in the last :data:`DEATH_WINDOW_S` seconds, by cause (signal)."""
    events = _recent_events(conn, c.deaths_key(role), c.DEATHS_MAX, now)
    by_cause: dict[str, int] = {}
    for event in events:
        cause = str(event.get("cause", "unknown cause"))
        by_cause[cause] = by_cause.get(cause, 0) + 1
    return {"last_10m": len(events), "by_cause": by_cause, "recent": events[:5]}


def model_verdicts(conn: redis.Redis, role: str) -> dict[str, Any]:
    """What the role's workers published at start about their models: probe verdict, load options."""
    found: dict[str, Any] = {}
    for name, raw in conn.hgetall(c.model_verdicts_key(role)).items():
        try:
            found[name.decode() if isinstance(name, bytes) else str(name)] = json.loads(raw)
        except ValueError:
            continue
    return found


def _model_line(role: str, name: str, info: dict[str, Any]) -> str | None:
    probe = info.get("probe")
    if not probe:
        return None
    options = ", ".join(f"{k}={v}" for k, v in sorted(info.get("load_options", {}).items())) or "llama.cpp defaults"
    if info.get("unavailable"):
        return f"model {name} ({role}): UNAVAILABLE: {info['unavailable']}"
    return f"model {name} ({role}): {probe['status']}, loaded with {options}: {probe['reason']}"


def refusal_counts(conn: redis.Redis, role: str) -> dict[str, int]:
    """Refused messages of a role, per reason."""
    raw = conn.hgetall(c.refused_counter_key(role))
    return {(key.decode() if isinstance(key, bytes) else key): int(value) for key, value in raw.items()}


def dead_letters(settings: Settings, role: str, limit: int = 20) -> list[dict[str, Any]]:
    """The newest refused raw messages of a role, as kept by the gate."""
    broker.require_reachable(settings)
    conn = broker.connect(redis_urls.connection_url(settings, acl.ADMIN))
    try:
        return [json.loads(raw) for raw in conn.lrange(c.dead_letter_key(role), 0, limit - 1)]
    finally:
        conn.close()
