"""The Python API (sync)."""

from xnai_tasks.client.sync import Client, TaskHandle

__all__ = ["Client", "TaskHandle"]
