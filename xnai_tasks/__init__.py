"""xnai-tasks: a signed, per-role Celery task queue for local-first multi-agent AI.

``xnai_tasks.app`` (the Celery app: ``celery -A xnai_tasks``), ``Client``, ``TaskHandle`` and their async
counterparts ``AsyncClient`` and ``AsyncTaskHandle`` are imported
when first asked for, so importing any ``xnai_tasks`` module (``celeryconfig`` imports the ACL rules) never
builds the app as a side effect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    from xnai_tasks.client.asynchronous import AsyncClient, AsyncTaskHandle
    from xnai_tasks.client.sync import Client, TaskHandle

    app: Celery

__all__ = ["AsyncClient", "AsyncTaskHandle", "Client", "TaskHandle", "app"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "app":
        from xnai_tasks.core.celery_app import app

        return app
    if name in ("Client", "TaskHandle"):
        from xnai_tasks.client import sync

        return getattr(sync, name)
    if name in ("AsyncClient", "AsyncTaskHandle"):
        from xnai_tasks.client import asynchronous

        return getattr(asynchronous, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
