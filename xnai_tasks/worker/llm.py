"""How a role task reaches its LLM: through the role's breaker and model pool (:mod:`xnai_tasks.resilience`).

Every LLM call of a role task goes through :func:`run_llm`; nothing else touches the LLM. A refused call
(:class:`~xnai_tasks.errors.BreakerOpenError`, :class:`~xnai_tasks.errors.PoolBusyError`) neither loads nor runs
the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from xnai_tasks.models import prompt_cache
from xnai_tasks.models.loading import LLM
from xnai_tasks.resilience.llm_guard import guard
from xnai_tasks.settings import process_settings
from xnai_tasks.worker import startup as runtime
from xnai_tasks.worker.timer import Timer

T = TypeVar("T")


def run_llm(role: str, timer: Timer, use: Callable[[LLM], T]) -> T:
    """``use(llm)`` with the role's LLM, behind its breaker and in a lease; a load it causes is timed as ``load``.

    The LLM gets this process's prompt cache (XNAI_PROMPT_CACHE_MB), made here, in the pool child, on first use.
    """
    holder = runtime.registry(role).llm
    capacity = process_settings().prompt_cache_mb * prompt_cache.MiB

    def call() -> T:
        with runtime.using(holder, timer) as llm, timer.phase("generate"):
            prompt_cache.attach(llm, capacity)
            return use(llm)

    return guard(role, holder.model.name).run(call)


def llm_blocked(role: str) -> str | None:
    """Why the role's LLM would be refused now (its breaker is open), without taking a probe; else None."""
    return guard(role, runtime.registry(role).llm.model.name).blocked()
