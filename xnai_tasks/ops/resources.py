"""The copilot's resource decisions: unload idle lazy models when RAM runs short, warm them before a scheduled run.

Each ``copilot.check_services`` tick (beat, every ``XNAI_COPILOT_EVERY_S``) reads psutil's available RAM,
every role's queue depth and when each ``XNAI_SCHEDULE`` entry is due next, then :func:`decide`:

* ``preload``: a scheduled workflow is due within ``XNAI_PRELOAD_AHEAD_S``: one pool process of each role it
  uses loads its lazy models now (the task ``ROLE.warm_models``), once per due run.
* ``release``: available RAM is under ``XNAI_MIN_FREE_MB``: the workers of every model role with nothing
  queued and no scheduled run due soon unload the lazy models no task is using (the signed control command
  of :mod:`xnai_tasks.worker.model_control`). Roles with queued work keep theirs: they are about to use them.

Every decision is one log line and one entry of a bounded list in Redis, shown by ``xnai status``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.settings import Settings
from xnai_tasks.workflow.schedule import DEFAULT_EVERY_S

log = logging.getLogger(__name__)

_MiB = 1024 * 1024
#: The roles that hold models (the copilot holds none).
#: The roles each built-in workflow sends steps to (xnai_tasks/workflow/builtin.py).
WORKFLOW_ROLES: dict[str, tuple[str, ...]] = {
    "research": ("curation", "grok", "cline"),
    "code": ("cline", "grok", "curation"),
    "review": ("grok", "curation"),
}
WARM_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Decision:
    """One thing the copilot did and why."""

    action: str
    roles: tuple[str, ...]
    reason: str
    at: float


@dataclass(frozen=True)
class Due:
    """A scheduled workflow's next run: the entry, its workflow, seconds until it is due, when, warmed for yet."""

    entry: str
    workflow: str
    in_s: float
    at: float
    warmed: bool = False


def decide(
    settings: Settings, *, available_bytes: int, queued: Mapping[str, int], due: list[Due], now: float
) -> list[Decision]:
    """What to do now (pure): warm the roles of runs due soon, release idle models of the others on low RAM."""
    decisions: list[Decision] = []
    soon = [d for d in due if settings.preload_ahead_s and d.in_s <= settings.preload_ahead_s]
    warming = sorted({role for d in soon for role in WORKFLOW_ROLES.get(d.workflow, ())})
    for d in (d for d in soon if not d.warmed):
        roles = WORKFLOW_ROLES.get(d.workflow, ())
        reason = f"scheduled workflow {d.workflow} ({d.entry}) due in {max(d.in_s, 0):.0f} s"
        decisions.append(Decision("preload", roles, reason, now))
    available_mb = available_bytes // _MiB
    if available_mb < settings.min_free_mb:
        kept = [r for r in c.WORKER_ROLES if queued.get(r, 0) or r in warming]
        idle = tuple(r for r in c.WORKER_ROLES if r not in kept)
        if idle:
            reason = f"available RAM {available_mb} MiB < XNAI_MIN_FREE_MB {settings.min_free_mb} MiB"
            if kept:
                reason += f" (kept: {', '.join(kept)}, work queued or scheduled)"
            decisions.append(Decision("release", idle, reason, now))
    return decisions


def due_runs(conn: redis.Redis, settings: Settings, now: float) -> list[Due]:
    """Each XNAI_SCHEDULE entry's next run: ``every_s`` after its last start (or now if never started)."""
    if not settings.schedule:
        return []
    key = c.copilot_schedule_key()
    found = []
    for name, entry in json.loads(settings.schedule).items():
        seen = {k.decode(): float(v) for k, v in conn.hgetall(key).items()}
        if f"{name}:seen" not in seen:  # the copilot's ACL has no HSETNX; one copilot writes this hash
            conn.hset(key, f"{name}:seen", str(now))
            seen[f"{name}:seen"] = now
        last = seen.get(name)
        # never started yet: beat runs it within every_s of its start, so warm once, now
        at = seen[f"{name}:seen"] if last is None else last + float(entry.get("every_s", DEFAULT_EVERY_S))
        warmed = seen.get(f"{name}:warmed", -1.0) >= at
        found.append(Due(name, str(entry["workflow"]), at - now, at, warmed))
    return found


def mark_started(conn: redis.Redis, entry: str, now: float | None = None) -> None:
    """Beat started the schedule entry ``entry`` now: its next run is due ``every_s`` later."""
    conn.hset(c.copilot_schedule_key(), entry, str(time.time() if now is None else now))


def tend(app: Any, conn: redis.Redis, settings: Settings, online: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """One tick: measure, decide, act, record. The decisions taken, as dicts."""
    import psutil

    now = time.time()
    queued = {role: broker.queue_depth(conn, c.queue_for(role)) for role in c.ROLES}
    due = due_runs(conn, settings, now)
    decisions = decide(
        settings, available_bytes=int(psutil.virtual_memory().available), queued=queued, due=due, now=now
    )
    for decision in decisions:
        detail = _act(app, decision, online)
        record(conn, decision, detail)
    for d in due:
        if settings.preload_ahead_s and d.in_s <= settings.preload_ahead_s and not d.warmed:
            conn.hset(c.copilot_schedule_key(), f"{d.entry}:warmed", str(d.at))
    return [asdict(d) for d in decisions]


def _act(app: Any, decision: Decision, online: Mapping[str, list[str]]) -> str:
    if decision.action == "preload":
        for role in decision.roles:
            app.send_task(c.task_name(role, "warm_models"), queue=c.queue_for(role), routing_key=role)
        return f"warm_models sent to {', '.join(decision.roles)}"
    from xnai_tasks.worker.model_control import RELEASE_COMMAND

    nodes = [node for role in decision.roles for node in online.get(role, [])]
    if not nodes:
        return "no worker of those roles online"
    replies = app.control.broadcast(RELEASE_COMMAND, destination=nodes, reply=True, timeout=WARM_TIMEOUT_S)
    return f"{len(replies or [])} of {len(nodes)} workers acknowledged"


def record(conn: redis.Redis, decision: Decision, detail: str) -> None:
    """One log line, and the decision at the head of the bounded list ``xnai status`` shows."""
    log.info(
        "copilot %s %s: %s; %s",
        decision.action,
        ",".join(decision.roles),
        decision.reason,
        detail,
        extra={"event": "copilot_decision", "action": decision.action},
    )
    entry = json.dumps({**asdict(decision), "detail": detail})
    pipe = conn.pipeline(transaction=True)
    pipe.lpush(c.copilot_decisions_key(), entry)
    pipe.ltrim(c.copilot_decisions_key(), 0, c.COPILOT_DECISIONS_MAX - 1)
    pipe.execute()


def recent_decisions(conn: redis.Redis, limit: int = 10) -> list[dict[str, Any]]:
    """The newest decisions first."""
    raw = conn.lrange(c.copilot_decisions_key(), 0, limit - 1)
    return [json.loads(item) for item in raw]
