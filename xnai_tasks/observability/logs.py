"""Structured logging: one JSON object a line to XNAI_HOME/logs/xnai.jsonl, plus plain text on stderr."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

from xnai_tasks.core import constants as c
from xnai_tasks.settings import Settings, process_settings

#: LogRecord attributes that are not "extra" fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON line: time, level, logger, pid, message, the running task's id and name, any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "process": record.processName,
            "msg": record.getMessage(),
        }
        entry.update(_current_task())
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _current_task() -> dict[str, str]:
    """The id and name of the task this thread is running, if any (a line logged during a task carries them)."""
    from celery._state import get_current_task

    task = get_current_task()
    request = getattr(task, "request", None)
    task_id = getattr(request, "id", None)
    if task is None or not task_id:
        return {}
    return {"task_id": str(task_id), "task_name": str(task.name)}


def setup_logging(settings: Settings, level: str | None = None, *, stderr: bool = True) -> None:
    """Configure the root logger once per process: JSON file under XNAI_HOME, text on stderr."""
    root = logging.getLogger()
    if getattr(root, "_xnai_configured", False):
        return
    root.setLevel(level or settings.log_level)
    settings.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = settings.log_dir / c.LOG_FILE
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    file_handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))
    file_handler.setFormatter(JsonFormatter())
    root.addHandler(file_handler)
    if stderr:
        text = logging.StreamHandler(sys.stderr)
        text.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(text)
    root._xnai_configured = True  # type: ignore[attr-defined]


def on_setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Celery's ``setup_logging`` signal: worker, beat and Flower log JSON lines under XNAI_HOME."""
    setup_logging(process_settings(), loglevel if isinstance(loglevel, str) else None)
