"""Which Celery nodes answer ``ping``, by node-name prefix (a role worker is ``ROLE@host``)."""

from __future__ import annotations

from celery import Celery

from xnai_tasks.core import constants as c


def nodes_online(app: Celery, timeout: float = 1.0) -> dict[str, list[str]]:
    """Node names answering ``ping`` (signed replies only, see security.control), per name prefix."""
    online: dict[str, list[str]] = {}
    for reply in app.control.ping(timeout=timeout) or []:
        for node in reply:
            online.setdefault(node.split("@", 1)[0], []).append(node)
    return online


def workers_online(app: Celery, timeout: float = 1.0) -> dict[str, list[str]]:
    """Role workers answering ``ping``, per role."""
    return {prefix: nodes for prefix, nodes in nodes_online(app, timeout).items() if prefix in c.ROLES}
