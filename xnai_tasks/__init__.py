"""xnai-tasks: a signed, per-role Celery task queue for local-first multi-agent AI."""

from xnai_tasks.client.sync import Client, TaskHandle
from xnai_tasks.core.celery_app import app

__all__ = ["Client", "TaskHandle", "app"]
__version__ = "0.1.0"
