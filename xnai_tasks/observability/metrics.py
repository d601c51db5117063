"""Prometheus metrics counted inside the workers, across prefork children (prometheus-client multiprocess mode).

Every process of ``xnai up`` gets ``PROMETHEUS_MULTIPROC_DIR`` (``XNAI_HOME/metrics``, emptied when ``xnai up``
starts) from the supervisor; a worker started on its own (``honcho start``) sets it to the same folder in its
``celeryd_init`` handler, before prometheus-client is first imported (the library reads it at import). Each
process writes its own files there, so counts of a child that died or a worker that restarted stay: the exporter
(:mod:`xnai_tasks.observability.metrics_exporter`) sums them at scrape time.

What is counted here: whether a model is loaded (a ``livemax`` gauge: only live processes count, so a worker
that died stops reporting its models), task outcomes (succeeded, failed, retried from ``task_postrun`` in the
child; worker_lost from the parent, where billiard reports a dead child: :mod:`xnai_tasks.worker.deliveries`),
task durations, the wait in the queue (from the signed message's time to the start), LLM tokens. Labels are the
role, the task's short name and the model: never a host name, a pid or a task id. What lives in Redis (queue
depths, refusals, deaths, workers online) is read by the exporter at scrape time instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from xnai_tasks.core import constants as c
from xnai_tasks.ops.proc import pid_alive
from xnai_tasks.settings import Settings, process_settings

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

#: The variable prometheus-client reads (once, at import) to write per-process files instead of keeping values.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: Outcomes of ``xnai_tasks_total`` by Celery state after the task ran; ``refused`` comes from Redis (the gate's
#: counters) and ``worker_lost`` from the parent.
OUTCOMES: Final = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried"}
OUTCOME_REFUSED: Final = "refused"
OUTCOME_WORKER_LOST: Final = "worker_lost"

DURATION_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0)
WAIT_BUCKETS: Final = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def prepare_dir(settings: Settings, *, clean: bool) -> Path:
    """Make the multiprocess folder (mode 0700); ``clean`` removes what earlier runs left (``xnai up`` at start)."""
    path = settings.metrics_dir
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if clean:
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
    return path


def child_env(settings: Settings) -> dict[str, str]:
    """What the supervisor adds to every child's environment."""
    return {MULTIPROC_ENV: str(settings.metrics_dir)}


class _Metrics:
    """This process's metric objects, made on first use (after ``PROMETHEUS_MULTIPROC_DIR`` is set)."""

    def __init__(self) -> None:
        self.made = False
        self.tasks: Counter | None = None
        self.duration: Histogram | None = None
        self.queue_wait: Histogram | None = None
        self.tokens: Counter | None = None
        self.loaded: Gauge | None = None
        #: Start time of each task running in this process, by task id (a child runs one at a time).
        self.started: dict[str, float] = {}

    def make(self) -> None:
        if self.made:
            return
        from prometheus_client import Counter, Gauge, Histogram

        self.tasks = Counter(
            c.METRIC_TASKS.removesuffix("_total"), "Tasks by role, task and outcome", ["role", "task", "outcome"]
        )
        self.duration = Histogram(
            c.METRIC_TASK_DURATION, "Seconds a task ran", ["role", "task"], buckets=DURATION_BUCKETS
        )
        self.queue_wait = Histogram(
            c.METRIC_QUEUE_WAIT, "Seconds from a message's signed time to its start", ["role"], buckets=WAIT_BUCKETS
        )
        self.tokens = Counter(
            c.METRIC_LLM_TOKENS.removesuffix("_total"), "LLM tokens (prompt and completion)", ["role", "model"]
        )
        self.loaded = Gauge(
            c.METRIC_MODEL_LOADED,
            "1 while a live worker process of the role holds the model loaded",
            ["role", "model"],
            multiprocess_mode="livemax",
        )
        self.made = True


_metrics = _Metrics()


def _labels(task_name: str) -> tuple[str, str] | None:
    """(role, short task name) of a task this worker runs; None for a name outside every role."""
    role = c.role_of_task(task_name)
    if role not in c.ROLES:
        return None
    return role, task_name.rsplit(".", 1)[-1]


def _signed_time(task: Any) -> float | None:
    from xnai_tasks.security.signature import SIG_HEADER

    request = getattr(task, "request", None)
    signature = getattr(request, SIG_HEADER, None)
    if signature is None and request is not None:
        headers = getattr(request, "headers", None) or {}
        signature = headers.get(SIG_HEADER) if isinstance(headers, dict) else None
    ts = signature.get("ts") if isinstance(signature, dict) else None
    return float(ts) if isinstance(ts, int | float) else None


# ---- signal handlers (connected by core/signal_handlers.install_signals) ----


def use_multiproc_dir(**_: Any) -> None:
    """``celeryd_init`` (the worker's parent, before the fork): the multiprocess folder, if no supervisor set one."""
    if not os.environ.get(MULTIPROC_ENV):
        settings = process_settings()
        os.environ[MULTIPROC_ENV] = str(prepare_dir(settings, clean=False))


def on_task_start(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """``task_prerun`` (the child): remember the start; observe the wait since the message was signed."""
    labels = _labels(str(getattr(task, "name", "")))
    if labels is None or task_id is None:
        return
    now = time.time()
    _metrics.make()
    _metrics.started[task_id] = time.monotonic()
    sent = _signed_time(task)
    if sent is not None and _metrics.queue_wait is not None:
        _metrics.queue_wait.labels(labels[0]).observe(max(0.0, now - sent))


def on_task_end(task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any) -> None:
    """``task_postrun`` (the child): the outcome and the duration."""
    labels = _labels(str(getattr(task, "name", "")))
    started = _metrics.started.pop(task_id or "", None)
    if labels is None:
        return
    _metrics.make()
    if started is not None and _metrics.duration is not None:
        _metrics.duration.labels(*labels).observe(time.monotonic() - started)
    outcome = OUTCOMES.get(state or "")
    if outcome is not None and _metrics.tasks is not None:
        _metrics.tasks.labels(*labels, outcome).inc()


def on_child_exit(pid: int | None = None, **_: Any) -> None:
    """``worker_process_shutdown``: a pool process exits; its live gauges go (its counters stay)."""
    mark_dead(pid)


def mark_dead(pid: int | None) -> None:
    """``multiprocess.mark_process_dead`` for ``pid`` when this process writes multiprocess files."""
    path = os.environ.get(MULTIPROC_ENV)
    if pid is None or not path:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


# ---- called from the code that knows (one line each) ----


def count_worker_lost(task_name: str, pid: int | None) -> None:
    """The parent saw the pool process running ``task_name`` die: count it, and mark the pid dead."""
    labels = _labels(task_name)
    if labels is not None:
        _metrics.make()
        if _metrics.tasks is not None:
            _metrics.tasks.labels(*labels, OUTCOME_WORKER_LOST).inc()
    mark_dead(pid)


def set_model_loaded(role: str, model: str, loaded: bool) -> None:
    """A worker process of ``role`` loaded (True) or dropped (False) ``model``."""
    if role not in c.ROLES:
        return
    _metrics.make()
    if _metrics.loaded is not None:
        _metrics.loaded.labels(role, model).set(1.0 if loaded else 0.0)


def prune_dead(path: Path) -> None:
    """Drop the live-gauge files of processes that no longer exist (a worker killed with SIGKILL says nothing).

    Counters and histograms of dead processes stay: their counts still happened.
    """
    from prometheus_client import multiprocess

    for file in path.glob("gauge_live*_*.db"):
        pid = file.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), str(path))  # type: ignore[no-untyped-call]


def count_tokens(model: str, tokens: int) -> None:
    """An LLM generation in this worker process: ``tokens`` more for the role's ``model``."""
    from xnai_tasks.worker.role import current_role

    role = current_role()
    if role is None or role not in c.ROLES:
        return
    _metrics.make()
    if _metrics.tokens is not None:
        _metrics.tokens.labels(role, model).inc(tokens)
