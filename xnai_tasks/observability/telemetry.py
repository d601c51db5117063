"""Local telemetry: one JSON line per finished task, written by the pool child that ran it.

Each line (a :class:`Record` as JSON) goes to ``XNAI_HOME/telemetry/YYYYMMDDHH-PID.jsonl``: one file per
process and hour (UTC), opened with ``O_APPEND`` and written with one ``os.write`` per line, so many
processes never share a file, a line is never split, and nothing rotates a file another process holds
(no RotatingFileHandler). Files older than ``XNAI_TELEMETRY_DAYS`` are deleted when a process opens a new
hour's file. ``xnai report`` (:mod:`xnai_tasks.observability.report`) reads them offline.

Connected by :func:`xnai_tasks.core.signal_handlers.install_signals`: ``task_prerun`` notes the start,
``task_postrun`` (which Celery sends after a success, a failure and a retry alike) writes the line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from xnai_tasks.client.outcome import REFUSALS
from xnai_tasks.core import constants as c
from xnai_tasks.security.signature import SIG_HEADER
from xnai_tasks.settings import Settings, process_settings

log = logging.getLogger(__name__)

#: Outcomes of a task: it returned, it refused (a RefusedError or one of its kind), it failed otherwise,
#: or it asked to be retried.
OUTCOMES = ("success", "refused", "error", "retry")


@dataclass(frozen=True, kw_only=True)
class Record:
    """One finished task."""

    task_id: str
    role: str
    task: str
    outcome: str
    #: Seconds from the message being signed (sent) to the task starting in the pool child; None if unsigned.
    queue_wait_s: float | None
    run_s: float
    tokens: int | None
    #: Whether a response cache answered (none exists yet: always None).
    cache: str | None
    model: str | None
    pid: int
    #: When the task finished (Unix time).
    ts: float

    def to_line(self) -> bytes:
        values = {name: getattr(self, name) for name in _FIELDS}  # flat: no deep copy (dataclasses.asdict)
        return (json.dumps(values, separators=(",", ":"), default=str) + "\n").encode()

    @property
    def started(self) -> float:
        return self.ts - self.run_s

    @property
    def sent(self) -> float:
        return self.started - (self.queue_wait_s or 0.0)

    @property
    def latency_s(self) -> float:
        """Sent to finished, as the worker saw it."""
        return (self.queue_wait_s or 0.0) + self.run_s

    @classmethod
    def from_json(cls, data: Any) -> Record:
        """A record from its JSON object; ValueError when a field is missing or of the wrong type."""
        if not isinstance(data, dict) or data.get("outcome") not in OUTCOMES:
            raise ValueError("not a telemetry record")
        wait = data.get("queue_wait_s")
        return cls(
            task_id=str(data["task_id"]),
            role=str(data["role"]),
            task=str(data["task"]),
            outcome=str(data["outcome"]),
            queue_wait_s=None if wait is None else float(wait),
            run_s=float(data["run_s"]),
            tokens=_int_or_none(data.get("tokens")),
            cache=None if data.get("cache") is None else str(data["cache"]),
            model=None if data.get("model") is None else str(data["model"]),
            pid=int(data["pid"]),
            ts=float(data["ts"]),
        )


_FIELDS: Final = tuple(field.name for field in fields(Record))


def outcome_of(state: str | None, retval: Any) -> str:
    """``task_postrun``'s state and return value as one of :data:`OUTCOMES`."""
    if state == "SUCCESS":
        return "success"
    if state == "RETRY":
        return "retry"
    return "refused" if type(retval).__name__ in REFUSALS else "error"


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def hour_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(c.TELEMETRY_HOUR_FORMAT)


class TelemetryWriter:
    """This process's telemetry file: reopened when the hour or the pid (after a fork) changes."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._key: tuple[str, int] | None = None
        #: The hour (Unix hours) and pid the open file is for: the file name is formatted only when it changes.
        self._hour: tuple[int, int] | None = None
        self._started: dict[str, tuple[float, float]] = {}

    def started(self, task_id: str) -> None:
        self._started[task_id] = (time.time(), time.monotonic())

    def finished(self, task_id: str) -> tuple[float, float] | None:
        """(wall start, run seconds) of a task :meth:`started` noted, forgetting it."""
        begun = self._started.pop(task_id, None)
        if begun is None:
            return None
        return begun[0], time.monotonic() - begun[1]

    def write(self, settings: Settings, record: Record) -> None:
        if settings.telemetry_days <= 0:
            return
        hour = (int(record.ts // 3600), os.getpid())  # a UTC hour is a whole number of Unix hours
        if self._fd is None or hour != self._hour:
            key = (hour_of(record.ts), hour[1])
            if self._fd is None or key != self._key:
                self._open(settings, key)
            self._hour = hour
        if self._fd is not None:
            os.write(self._fd, record.to_line())  # one write of one line, O_APPEND: never interleaved

    def _open(self, settings: Settings, key: tuple[str, int]) -> None:
        if self._fd is not None and self._key is not None and self._key[1] == key[1]:
            os.close(self._fd)  # our own previous hour (a forked child's inherited fd is the parent's)
        self._fd = None
        directory = settings.telemetry_dir
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        prune(directory, keep_s=settings.telemetry_days * 86400.0)
        path = directory / c.telemetry_file_name(*key)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._key = key


def prune(directory: Path, *, keep_s: float, now: float | None = None) -> list[Path]:
    """Delete telemetry files last written more than ``keep_s`` seconds ago; the deleted paths."""
    cutoff = (time.time() if now is None else now) - keep_s
    removed = []
    for path in directory.glob(f"*{c.TELEMETRY_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):  # another process pruned it first
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
    return removed


def read_records(directory: Path, *, since: float | None = None) -> Iterator[Record]:
    """Every record in ``directory`` that finished at or after ``since`` (Unix time); bad lines skipped."""
    if not directory.is_dir():
        return
    first_hour = hour_of(since) if since is not None else ""
    for path in sorted(directory.glob(f"*{c.TELEMETRY_SUFFIX}")):
        if path.name[: len(first_hour)] < first_hour:
            continue  # a file of an hour entirely before ``since``
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    record = Record.from_json(json.loads(line))
                except (ValueError, TypeError, KeyError):
                    continue  # a line cut by a crash mid-write, or not ours
                if since is None or record.ts >= since:
                    yield record


#: This process's writer (a pool child forks an empty one: the pid in its key differs).
writer = TelemetryWriter()


def on_task_prerun(task_id: str | None = None, **_: Any) -> None:
    """Celery's ``task_prerun`` (pool child): note when the task started."""
    if task_id:
        writer.started(task_id)


def on_task_postrun(
    task_id: str | None = None, task: Any = None, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    """Celery's ``task_postrun`` (pool child): append the task's telemetry line. Never raises."""
    try:
        _record(task_id, task, retval, state)
    except Exception as exc:  # telemetry must never fail a task
        log.warning("telemetry not written for %s: %s", task_id, exc)


def _record(task_id: str | None, task: Any, retval: Any, state: str | None) -> None:
    if not task_id or task is None:
        return
    now = time.time()
    begun = writer.finished(task_id)
    start, run_s = begun if begun is not None else (now, 0.0)
    name = str(getattr(task, "name", ""))
    signature = getattr(getattr(task, "request", None), SIG_HEADER, None)
    sent = signature.get("ts") if isinstance(signature, dict) else None
    result = retval if isinstance(retval, dict) else {}
    record = Record(
        task_id=task_id,
        role=c.role_of_task(name),
        task=name,
        outcome=outcome_of(state, retval),
        queue_wait_s=round(max(0.0, start - float(sent)), 6) if isinstance(sent, int | float) else None,
        run_s=round(run_s, 6),
        tokens=_int_or_none(result.get("completion_tokens")),
        cache=None,
        model=str(result["model"]) if isinstance(result.get("model"), str) else None,
        pid=os.getpid(),
        ts=now,
    )
    writer.write(process_settings(), record)
