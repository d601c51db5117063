"""xnai-tasks: a signed, per-role Celery task queue for local-first multi-agent AI."""

from xnai_tasks.celery_app import app
from xnai_tasks.client import Client, TaskHandle

__all__ = ["Client", "TaskHandle", "app"]
__version__ = "0.1.0"
