"""Every Celery signal handler of xnai-tasks, connected by one call, in the order they must run.

Celery's signals are process-wide. :func:`install_signals` runs when an app is created
(:func:`xnai_tasks.core.celery_app.create_app`); connecting twice is harmless (each handler has a
``dispatch_uid``). Nothing is connected by importing a module.
"""

from __future__ import annotations

from typing import Any

from celery import signals


def install_signals() -> None:
    """Connect the handlers: logging, the worker's start-up, the publish hook and the replay ledger."""
    from xnai_tasks.admission import throughput
    from xnai_tasks.observability import metrics, telemetry
    from xnai_tasks.observability.logs import on_setup_logging
    from xnai_tasks.security.ledger import finish_task
    from xnai_tasks.security.publish import sign_outgoing
    from xnai_tasks.worker import model_control, startup
    from xnai_tasks.worker.role import decide_role

    connections: list[tuple[Any, Any]] = [
        # Worker, beat and Flower log JSON lines under XNAI_HOME instead of Celery's default.
        (signals.setup_logging, on_setup_logging),
        # The worker's parent, before anything connects: first the role (its ACL user and signing key),
        # then what the start-up needs to know of the command line.
        (signals.celeryd_init, decide_role),
        (signals.celeryd_init, startup.remember_options),
        # The parent, before the pool forks: plan, models, LLM probe; then gc.freeze for preloaded models.
        (signals.worker_init, startup.on_worker_init),
        (signals.celeryd_after_setup, startup.freeze_before_fork),
        # Each pool child: its threads.
        (signals.worker_process_init, startup.on_child_start),
        # Each pool child: unload idle lazy models when the copilot's release reaches it (worker/model_control.py).
        (signals.worker_process_init, model_control.install_release_handler),
        # Every process that publishes: sign each task message.
        (signals.before_task_publish, sign_outgoing),
        # The pool child, after a task: its nonce is done.
        (signals.task_postrun, finish_task),
        # The pool child, around a task: one telemetry line per finished task (XNAI_HOME/telemetry).
        (signals.task_prerun, telemetry.on_task_prerun),
        (signals.task_postrun, telemetry.on_task_postrun),
        # The pool child, after a task: the role's recent throughput (the retry-after of a refused submit).
        (signals.task_postrun, throughput.on_task_postrun),
        # Prometheus (observability/metrics.py): the multiprocess folder before the fork, then per task in the
        # child its wait, duration and outcome; a pool process that exits has its pid marked dead.
        (signals.celeryd_init, metrics.use_multiproc_dir),
        (signals.task_prerun, metrics.on_task_start),
        (signals.task_postrun, metrics.on_task_end),
        (signals.worker_process_shutdown, metrics.on_child_exit),
    ]
    model_control.register_release_command()
    for signal, handler in connections:
        signal.connect(handler, weak=False, dispatch_uid=f"xnai.{handler.__module__}.{handler.__name__}")
