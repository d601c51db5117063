"""Running one role's worker: the Celery prefork worker bound to that role's queue."""

from __future__ import annotations

from xnai_tasks.core import constants as c
from xnai_tasks.observability.logs import setup_logging
from xnai_tasks.settings import Settings


def default_concurrency(settings: Settings, role: str) -> int:
    """Pool processes when the command line does not say: the plan's (``xnai plan``)."""
    from xnai_tasks.plan.host import plan_for

    return plan_for(settings).roles[role].processes


def worker_argv(settings: Settings, role: str, *, concurrency: int, beat: bool) -> list[str]:
    """The ``celery worker`` arguments for a role."""
    argv = [
        "worker",
        f"--queues={c.queue_for(role)}",
        f"--hostname={c.worker_hostname(role)}",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        f"--loglevel={settings.log_level}",
        "--task-events",
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        argv += ["--beat", f"--schedule={settings.home / c.BEAT_SCHEDULE_FILE}"]
    return argv


def run_worker(settings: Settings, role: str, *, concurrency: int | None = None, beat: bool = False) -> None:
    """Run the role's worker in this process until it is stopped."""
    from xnai_tasks.core.celery_app import app

    setup_logging(settings)
    app.worker_main(
        worker_argv(settings, role, concurrency=concurrency or default_concurrency(settings, role), beat=beat)
    )
