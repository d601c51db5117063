"""Celery settings for xnai-tasks: broker, queues, routes, serialization and reliability.

The values that depend on the environment (broker URL, time limits) come from a validated
:class:`xnai_tasks.settings.Settings`; :func:`build` turns one into Celery's configuration.
Nothing here reads the environment at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kombu import Exchange, Queue

from xnai_tasks.core import constants as c
from xnai_tasks.security import acl, redis_urls, role_config
from xnai_tasks.security.limits import MAX_DEPTH
from xnai_tasks.workflow.schedule import beat_entries

if TYPE_CHECKING:
    from xnai_tasks.settings import Settings

#: JSON only, everywhere: task bodies, results, events. Never a Python-object serializer.
SERIALIZATION: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "event_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
}

#: The README's Reliability section: a task is acked after it ran, a lost worker's task goes back to the queue,
#: model workers take one message at a time, results expire.
RELIABILITY: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "task_acks_on_failure_or_timeout": True,
    "worker_prefetch_multiplier": 1,
    "task_track_started": True,
    "result_expires": 24 * 3600,
    "broker_connection_retry_on_startup": True,
    "broker_connection_timeout": 3,
    "worker_cancel_long_running_tasks_on_connection_loss": True,
    # Flower and `xnai status` need events.
    "worker_send_task_events": True,
    "task_send_sent_event": True,
    # Task arguments in those events (what Flower shows) written out as deep as the gate lets them nest,
    # not cut to `[...]` past 3 levels (Celery still writes at most 1024 characters of them).
    "task_repr_maxlevels": MAX_DEPTH,
}

#: Retry policy for transient errors inside tasks (see xnai_tasks.worker.role_task.RoleTask).
RETRY_BACKOFF_MAX_S = 60
RETRY_MAX = 3


def task_queues() -> list[Queue]:
    """One durable queue per role, bound to a direct exchange of its own named after the role.

    kombu keeps an exchange's bindings in the set ``_kombu.binding.EXCHANGE``, which a worker writes
    when it declares its queue. With one exchange per role, that set is ``_kombu.binding.ROLE`` and
    only that role (and the copilot) may write it: a compromised worker cannot add a binding that
    routes another role's messages into its own queue (xnai_tasks.security.acl).
    """
    return [Queue(c.queue_for(role), Exchange(role, type="direct"), routing_key=role) for role in c.ROLES]


def task_routes() -> dict[str, dict[str, str]]:
    """``ROLE.*`` tasks go to the ROLE queue and nowhere else."""
    return {f"{role}.*": {"queue": c.queue_for(role), "routing_key": role} for role in c.ROLES}


def transport_options(settings: Settings, role: str | None = None) -> dict[str, Any]:
    """kombu Redis transport options shared by producers and workers.

    With a role (or ``flower``), the unacked hash, its index and the restore mutex are that role's own
    keys (``unacked:ROLE`` ...): its ACL user may write those and no other role's.
    """
    options: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout,
        "socket_connect_timeout": 3,
        "socket_timeout": 30,
        "max_retries": 2,
        "interval_start": 0,
        "interval_step": 0.5,
        "interval_max": 1,
        # Sweep for messages unacked past the visibility timeout every 10 s (kombu's default: ~100 s).
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
        # Load shedding: a push to a role queue at its cap is refused (xnai_tasks/admission/channel.py).
        "xnai_queue_caps": {c.queue_for(role): settings.queue_cap(role) for role in c.ROLES},
    }
    if role is not None and role != acl.ADMIN:
        options.update(role_config.worker_transport_options(role))
    return options


def identity(settings: Settings, role: str | None = None) -> tuple[str, str | None]:
    """The broker URL and the ACL user a process connects as.

    The embedded Redis runs with ACLs: ``role`` (default: the copilot, the producer the Python API
    is) gets its credentials. An external URL is used as given; the user it names, if any, is the role.
    """
    if settings.embedded:
        user = role or acl.DEFAULT_USER
        return redis_urls.connection_url(settings, user), user
    if settings.joined_roles and role is not None:  # a host joined to a hub: the role's own URL
        return redis_urls.connection_url(settings, role), role
    named = role or redis_urls.url_user(settings.broker_url)
    return settings.broker_url, named if role or named in acl.USERS else None


def build(settings: Settings, role: str | None = None) -> dict[str, Any]:
    """The full Celery configuration for these settings, connecting as ``role`` (see :func:`identity`)."""
    url, user = identity(settings, role)
    return {
        **SERIALIZATION,
        **RELIABILITY,
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": transport_options(settings, user),
        # whose result namespace this process writes (xnai_tasks.security.results.SignedRedisBackend)
        "xnai_result_role": user if user in c.ROLES else None,
        "result_backend_transport_options": {"retry_policy": {"timeout": 3.0}},
        "redis_socket_connect_timeout": 3,
        "redis_socket_timeout": 30,
        "task_queues": task_queues(),
        "task_routes": task_routes(),
        "task_default_queue": c.queue_for("copilot"),
        "task_create_missing_queues": False,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": settings.soft_time_limit,
        "beat_schedule_filename": str(settings.home / c.BEAT_SCHEDULE_FILE),
        "beat_schedule": {
            # services, RAM and queue pressure (workers/copilot.py, xnai_tasks/ops/resources.py)
            "check-services": {"task": "copilot.check_services", "schedule": float(settings.copilot_every_s)},
            **beat_entries(settings.schedule),  # XNAI_SCHEDULE: workflows (xnai_tasks/workflow/schedule.py)
        },
        "worker_hijack_root_logger": False,
        # the gate in front of every message; messages held when the broker connection drops are given back on reconnect
        "worker_consumer": "xnai_tasks.resilience.reconnect:RestoringConsumer",
        # XNAI_TASK_MODULES: more ROLE.* task modules (e.g. the tests' own), imported as the role modules are.
        "imports": list(settings.task_modules),
    }
