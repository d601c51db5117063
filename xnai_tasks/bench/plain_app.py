"""The baseline of ``xnai bench roundtrip``: a plain Celery app, JSON, same Redis, same worker settings."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

import celeryconfig
from xnai_tasks.security import acl, redis_urls
from xnai_tasks.settings import process_settings

QUEUE = "bench_plain"


def baseline_config(queue: str) -> dict[str, Any]:
    """What every baseline app shares with ours: Redis, reliability settings, one queue; JSON."""
    settings = process_settings()
    url = redis_urls.connection_url(settings, acl.ADMIN)
    return {
        **celeryconfig.SERIALIZATION,
        **celeryconfig.RELIABILITY,
        "broker_url": url,
        "result_backend": url,
        "broker_transport_options": celeryconfig.transport_options(settings),
        "task_queues": [Queue(queue)],
        "task_default_queue": queue,
    }


def _config() -> dict[str, Any]:
    return baseline_config(QUEUE)


app = Celery("plain", set_as_current=False)
app.add_defaults(_config)


@app.task(name="plain.noop")  # type: ignore[untyped-decorator]
def noop(value: Any = None) -> Any:
    """Return the value: the same work as our ``echo``."""
    return value
