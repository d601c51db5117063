"""Running one role's worker: the Celery prefork worker bound to that role's queue."""

from __future__ import annotations

from xnai_tasks.core import constants as c
from xnai_tasks.observability.logs import setup_logging
from xnai_tasks.settings import Settings


#: How long a worker of the embedded Redis waits for it at start: the Procfile starts Redis and the workers at once.
def default_concurrency(settings: Settings, role: str) -> int:
    """Pool processes when the command line does not say: the plan's (``xnai plan``)."""
    from xnai_tasks.plan.host import plan_for

    return plan_for(settings).roles[role].processes


def worker_argv(settings: Settings, role: str, *, concurrency: int, beat: bool) -> list[str]:
    """The ``celery worker`` arguments for a role (a batching one: task threads, see xnai_tasks/batching)."""
    from xnai_tasks.batching.runtime import batches, task_threads

    pool = "threads" if batches(settings, role) else "prefork"
    argv = [
        "worker",
        f"--queues={c.queue_for(role)}",
        f"--hostname={c.worker_hostname(role)}",
        f"--concurrency={task_threads(settings) if pool == 'threads' else concurrency}",
        f"--pool={pool}",
        f"--loglevel={settings.log_level}",
        "--task-events",
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        argv += ["--beat", f"--schedule={settings.home / c.BEAT_SCHEDULE_FILE}"]
    return argv


def run_worker(settings: Settings, role: str, *, concurrency: int | None = None, beat: bool = False) -> None:
    """Run the role's worker in this process until it is stopped.

    A broker that does not answer at start is :class:`~xnai_tasks.errors.BrokerUnreachableError` (one line,
    exit 6), not Celery's hundred retries; one lost later is retried by Celery, one line a try.
    """
    from xnai_tasks.core import broker
    from xnai_tasks.core.celery_app import app

    broker.require_reachable(settings, wait_s=broker.startup_wait_s(settings))
    setup_logging(settings)
    app.worker_main(
        worker_argv(settings, role, concurrency=concurrency or default_concurrency(settings, role), beat=beat)
    )
