"""The base task of every role and the decorator that registers a role's task.

A role's task is named ``ROLE.NAME`` and routed to the ROLE queue (celeryconfig.task_routes), so
it can only land in its own queue.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from celery import Task

import celeryconfig
from xnai_tasks.core import constants as c
from xnai_tasks.core.celery_app import app
from xnai_tasks.errors import TransientError, UsageError

F = TypeVar("F", bound=Callable[..., Any])


class RoleTask(Task):  # type: ignore[misc]
    """Base task: acks late, requeued when its worker dies, retried with backoff and jitter on transient errors."""

    acks_late = True
    reject_on_worker_lost = True
    autoretry_for = (TransientError,)
    retry_backoff = True
    retry_backoff_max = celeryconfig.RETRY_BACKOFF_MAX_S
    retry_jitter = True
    max_retries = celeryconfig.RETRY_MAX
    #: Counts the deaths of the process running a message and stops redelivering it at XNAI_MAX_DELIVERIES;
    #: cancelled because the broker connection was lost, it stores no RETRY state (resilience/reconnect.py).
    Request = "xnai_tasks.resilience.reconnect:CancellableRequest"

    @property
    def role(self) -> str:
        """The role this task belongs to: the prefix of its name."""
        return c.role_of_task(str(self.name))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task, unless a close earlier request answers it (``cache="semantic"``, xnai_tasks/cache)."""
        from xnai_tasks.cache.worker_side import semantic_answer

        role, short = c.split_task_name(str(self.name))
        answer = semantic_answer(self, role, short, kwargs) if not args else None
        return answer if answer is not None else super().__call__(*args, **kwargs)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Store the answer in the response cache when its request asked for it (xnai_tasks/cache)."""
        from xnai_tasks.cache.worker_side import store_answer

        role, short = c.split_task_name(str(self.name))
        store_answer(self, role, short, task_id, kwargs or {}, retval)


def role_task(role: str, **options: Any) -> Callable[[F], F]:
    """Register ``fn`` as the task ``ROLE.<fn name>`` bound to the ROLE queue."""
    if role not in c.ROLES:
        raise ValueError(f"unknown role {role!r}")

    def register(fn: F) -> F:
        name = c.task_name(role, fn.__name__)
        task = app.task(name=name, base=RoleTask, bind=True, **options)(fn)
        return task  # type: ignore[no-any-return]

    return register


def role_tasks(extra_modules: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Every registered task per role, as short names: the catalogue the client validates against.

    ``extra_modules`` (``XNAI_TASK_MODULES``) are imported first, so their tasks are known too.
    """
    import importlib

    app.loader.import_default_modules()
    for module in extra_modules:
        importlib.import_module(module)
    catalogue: dict[str, list[str]] = {role: [] for role in c.ROLES}
    for name in app.tasks:
        role, short = c.split_task_name(name)
        if role in catalogue and short:
            catalogue[role].append(short)
    return {role: sorted(names) for role, names in catalogue.items()}


def check_call(role: str, task: str, kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`UsageError` unless ``kwargs`` fit the Python signature of the registered task ``ROLE.TASK``.

    A missing or unknown argument is refused before anything is sent, naming the task's parameters, e.g.
    ``grok.synthesize takes prompt, context=..., ...: missing prompt``. The task must be in the catalogue
    (:func:`role_tasks` imported its module).
    """
    name = c.task_name(role, task)
    params = _parameters(app.tasks[name].run)
    by_name = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [param for param in required if param not in kwargs or param not in by_name]
    any_name = any(p.kind is p.VAR_KEYWORD for p in params)
    # a name that is no identifier is quoted, so that no key of the JSON can break the line
    unknown = [] if any_name else [k if k.isidentifier() else repr(k) for k in kwargs if k not in by_name]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    if problems:
        raise UsageError(f"{name} takes {_describe_parameters(params)}: {'; '.join(problems)}")


@functools.lru_cache(maxsize=256)
def _parameters(run: Callable[..., Any]) -> tuple[inspect.Parameter, ...]:
    """The parameters of a task's ``run`` (bound: no ``self``), worked out once per task, not per submit."""
    return tuple(inspect.signature(run).parameters.values())


def _describe_parameters(params: Sequence[inspect.Parameter]) -> str:
    """``prompt, max_tokens=...``: the parameters a caller may pass, required ones bare."""
    words = []
    for param in params:
        if param.kind is param.VAR_POSITIONAL:
            continue
        if param.kind is param.VAR_KEYWORD:
            words.append(f"**{param.name}")
        else:
            words.append(param.name if param.default is param.empty else f"{param.name}=...")
    return ", ".join(words) or "no arguments"


def register_diagnostics(role: str) -> None:
    """Register the tasks every role has: ``health`` (facts of the process) and ``echo`` (round-trip probe)."""
    from xnai_tasks.worker.health import process_facts  # keeps psutil out of client imports

    def health(self: RoleTask) -> dict[str, Any]:
        """Facts of the worker process that ran this task."""
        return process_facts(role, self.request.hostname, loaded_models(role))

    def echo(self: RoleTask, value: Any = None, delay_s: float = 0.0, retries: int = 0) -> Any:
        """Return ``value`` after ``delay_s`` seconds: the probe used by benchmarks and reliability tests.

        With ``retries=N`` it first retries itself N times (each retry is a new message, signed by this worker).
        """
        if self.request.retries < int(retries):
            raise self.retry(countdown=0, max_retries=int(retries))
        if delay_s:
            time.sleep(float(delay_s))
        return value

    def warm_models(self: RoleTask) -> dict[str, Any]:
        """Load the role's lazy models in this process now (the copilot, before a scheduled workflow)."""
        from xnai_tasks.worker.model_control import warm

        return {"pid": os.getpid(), "models": warm(role)}

    role_task(role)(health)
    role_task(role)(echo)
    role_task(role)(warm_models)


def loaded_models(role: str) -> list[dict[str, Any]]:
    """The role's models in this worker process: name, kind, mode (preload/lazy), loaded or not, sizes, threads."""
    from xnai_tasks.worker import startup as runtime

    return runtime.describe(role)
