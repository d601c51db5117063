"""Workflows the copilot's beat runs on a schedule: ``XNAI_SCHEDULE``, a JSON object of named entries.

``{"nightly-research": {"workflow": "research", "kwargs": {"topic": "..."}, "every_s": 86400}}``
"""

from __future__ import annotations

import json
from typing import Any

from xnai_tasks.errors import SettingsError

#: Seconds between two runs of a scheduled workflow whose entry gives no ``every_s``.
DEFAULT_EVERY_S = 3600

#: The copilot task beat sends for each entry (workers/copilot.py).
RUN_TASK = "copilot.run_workflow"
MIN_EVERY_S = 10.0
_FIELDS = ("workflow", "kwargs", "every_s")


def parse_schedule(raw: str) -> str:
    """XNAI_SCHEDULE checked and returned in canonical form; SettingsError naming what is wrong."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(f"XNAI_SCHEDULE is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError('XNAI_SCHEDULE must be a JSON object, e.g. {"n": {"workflow": "research", ...}}')
    for name, entry in data.items():
        _check_entry(str(name), entry)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _check_entry(name: str, entry: Any) -> None:
    where = f"XNAI_SCHEDULE.{name}"
    if not isinstance(entry, dict) or set(entry) - set(_FIELDS) or "workflow" not in entry:
        raise SettingsError(f"{where} must be an object with workflow and optionally kwargs, every_s")
    if not isinstance(entry["workflow"], str) or not isinstance(entry.get("kwargs", {}), dict):
        raise SettingsError(f"{where}: workflow must be a name and kwargs an object")
    every = entry.get("every_s", DEFAULT_EVERY_S)
    if isinstance(every, bool) or not isinstance(every, int | float) or every < MIN_EVERY_S:
        raise SettingsError(f"{where}.every_s must be a number of seconds, at least {MIN_EVERY_S:g}")


def beat_entries(schedule: str | None) -> dict[str, dict[str, Any]]:
    """Celery beat entries for a (checked) XNAI_SCHEDULE: each sends ``copilot.run_workflow`` every ``every_s``."""
    if not schedule:
        return {}
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in json.loads(schedule).items():
        entries[f"workflow-{name}"] = {
            "task": RUN_TASK,
            "schedule": float(entry.get("every_s", DEFAULT_EVERY_S)),
            "kwargs": {"workflow": entry["workflow"], "kwargs": entry.get("kwargs", {}), "schedule": name},
            "options": {"queue": "copilot", "routing_key": "copilot"},
        }
    return entries
