"""Which role this worker process serves, decided once when the Celery worker starts.

``xnai worker grok`` and plain ``celery -A xnai_tasks worker -Q grok`` both end here: Celery's
``celeryd_init`` signal carries the node name and the ``-Q`` option before anything connects, so the
role's key, credentials and models can be chosen from it.
"""

from __future__ import annotations

import sys
from typing import Any

from xnai_tasks.core import constants as c
from xnai_tasks.errors import UsageError, XnaiError


class _WorkerRole:
    """The role this process serves; pool children inherit it from the worker parent."""

    def __init__(self) -> None:
        self.role: str | None = None
        #: Why this worker cannot sign as its role (no keyring, a revoked key), reported once the broker answers.
        self.signing_problem: XnaiError | None = None


_worker_role = _WorkerRole()


def role_from_options(hostname: str | None, queues: Any) -> str | None:
    """The role named by ``-Q`` (exactly one role queue), else by the node name ``ROLE@host``."""
    if isinstance(queues, str):
        names = [q.strip() for q in queues.split(",") if q.strip()]
    elif isinstance(queues, list | tuple):
        names = [str(q) for q in queues]
    else:
        names = []
    roles = [name for name in names if name in c.ROLES]
    if len(roles) == 1:
        return roles[0]
    prefix = (hostname or "").split("@", 1)[0]
    return prefix if prefix in c.ROLES else None


def check_node_name(role: str, node: str) -> None:
    """Exit with one line (usage, exit 2) unless a worker of ``role`` may be the node ``node``.

    The node's control queue is ``NODE.celery.pidbox`` and the role's Redis user may touch only ``ROLE@*`` ones
    (and Celery's default ``celery@HOST``): any other name would fail later, deep in Celery, on that queue.
    """
    from xnai_tasks.security.acl import node_name_allowed

    if node_name_allowed(role, node):
        return
    print(
        f'xnai: a {role} worker\'s node name must start with "{role}@" (got "{node}"): use -n {role}@NAME, or no -n',
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(UsageError.exit_code)


def current_role() -> str | None:
    """The role of this worker process (inherited by pool children), or None outside a role worker."""
    return _worker_role.role


def set_role(role: str | None) -> None:
    """Set the role (done by the celeryd_init handler; tests and tools may set it directly)."""
    if role is not None and role not in c.ROLES:
        raise ValueError(f"unknown role {role!r}")
    _worker_role.role = role


def decide_role(sender: str | None = None, conf: Any = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    """Pick the role; from now on connect as its Redis ACL user and sign as its agent.

    This runs in the worker's parent before anything connects or forks, so pool children inherit both.
    """
    from xnai_tasks.security import role_config
    from xnai_tasks.security.publish import use_agent
    from xnai_tasks.settings import process_settings

    role = role_from_options(sender, (options or {}).get("queues"))
    if role is not None and sender is not None:
        check_node_name(role, str(sender))  # before anything connects
    set_role(role)
    if role is None:
        return
    settings = process_settings()
    if conf is not None:
        role_config.apply_role(conf, settings, role)
        conf["xnai_control_agent"] = role  # control commands this worker sends are signed as its role
    try:
        use_agent(settings.home, role)
    except XnaiError as exc:  # Celery would log and swallow it: worker/startup.py stops the worker with it
        _worker_role.signing_problem = exc


def signing_problem() -> XnaiError | None:
    """Why this worker cannot sign as its role (None: it can)."""
    return _worker_role.signing_problem
