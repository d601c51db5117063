"""A Celery app's configuration acting as one ACL user: its credentials and its own unacked keys."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from xnai_tasks.core import constants as c
from xnai_tasks.security.acl import ADMIN, FLOWER, USERS
from xnai_tasks.security.password_file import ensure_passwords
from xnai_tasks.security.redis_urls import connection_url, with_credentials
from xnai_tasks.settings import Settings


def worker_transport_options(role: str) -> dict[str, Any]:
    """kombu transport options giving a role its own unacked hash, index and restore mutex.

    Flower acknowledges nothing (its control replies and events are consumed without acks), so it
    gets no unacked keys at all: ack emulation is off, and with it the restore sweep and its mutex.
    """
    if role == FLOWER:
        return {"ack_emulation": False}
    return {
        "unacked_key": c.unacked_key(role),
        "unacked_index_key": c.unacked_index_key(role),
        "unacked_mutex_key": c.unacked_mutex_key(role),
    }


def apply_role(conf: MutableMapping[str, Any], settings: Settings, role: str) -> None:
    """Make a Celery app's configuration act as ``role`` (a role, ``flower`` or ``admin``).

    The embedded Redis: broker and result backend connect as that user. An external URL is kept as
    configured (it carries whatever credential the operator gave this host). Either way the transport
    options gain the role's own unacked keys, which its user may write.
    """
    if role not in USERS:
        raise ValueError(f"unknown ACL user {role!r} (users: {', '.join(USERS)})")
    if settings.embedded:
        password = ensure_passwords(settings.home)[role]
        conf["broker_url"] = with_credentials(settings.broker_url, role, password)
        conf["result_backend"] = conf["broker_url"]
    elif settings.joined_roles:  # a host joined to a hub: the role's own URL from its bundle
        conf["broker_url"] = connection_url(settings, role)
        conf["result_backend"] = conf["broker_url"]
    conf["xnai_result_role"] = role if role in c.ROLES else None
    options = dict(conf.get("broker_transport_options") or {})
    if role != ADMIN:
        options.update(worker_transport_options(role))
    conf["broker_transport_options"] = options
