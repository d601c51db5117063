"""The one place an LLM call passes: its role's breaker for the model, then a lease of the model's pool.

:func:`guarded` refuses at once when the breaker is open (:class:`BreakerOpenError`, before anything loads or
runs), waits for a lease, runs the call, and tells the breaker how it went: an exception, or an answer later
than ``XNAI_LLM_SLOW``, is a failure; a refusal or the caller's own mistake (a usage error, a prompt too long for
the context) is neither a failure nor a success.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Final, TypeVar

import redis

from xnai_tasks.errors import PromptTooLongError, RefusedError, UsageError
from xnai_tasks.resilience.breaker import (
    Breaker,
    BreakerPolicy,
    Ticket,
    busy_message,
    open_message,
    read_state,
)
from xnai_tasks.resilience.pool import ModelPool
from xnai_tasks.settings import Settings, process_settings

T = TypeVar("T")

#: What a call may raise that says nothing about the model's health.
NOT_A_MODEL_FAILURE: Final = (RefusedError, UsageError, PromptTooLongError)


class Guard:
    """The breaker and the pool of ``role``'s calls to ``model`` on this host."""

    def __init__(self, conn: redis.Redis, settings: Settings, role: str, model: str, *, cap: int) -> None:
        self.settings = settings
        policy = BreakerPolicy.from_settings(settings)
        self.breaker = Breaker(conn, role, model, policy) if settings.breaker else None
        self.pool = ModelPool(conn, role, model, socket.gethostname(), cap=cap, lease_s=settings.pool_lease)

    def blocked(self) -> str | None:
        """Why a call would be refused now (open, or half-open with a probe running), read without taking anything."""
        b = self.breaker
        if b is None:
            return None
        state = read_state(b.conn, b.role, b.model)
        if state.state == "open":
            return open_message(b.role, b.model, state.reason, state.retry_in_s)
        if state.state == "half_open" and b.conn.exists(b.keys[1]):
            return busy_message(b.role, b.model, state.reason)
        return None

    def run(self, call: Callable[[], T]) -> T:
        """``call()`` behind the breaker, holding a lease; raises what it raises, or a refusal."""
        ticket = self.breaker.admit() if self.breaker is not None else Ticket(probe=False, token="")
        outcome, detail = "cancel", ""
        try:
            with self.pool.lease(self.settings.pool_wait):
                start = time.monotonic()
                try:
                    value = call()
                except Exception as exc:
                    if not isinstance(exc, NOT_A_MODEL_FAILURE):
                        outcome, detail = "fail", f"{type(exc).__name__}: {exc}"
                    raise
                took = time.monotonic() - start
                slow = took > self.settings.llm_slow
                outcome = "fail" if slow else "ok"
                detail = f"a call took {took:.0f} s (XNAI_LLM_SLOW={self.settings.llm_slow})" if slow else ""
                return value
        finally:
            if self.breaker is not None:
                self.breaker.settle(ticket, outcome, detail)


class _PoolCaps:
    """This process's pool cap per role, from the plan (worked out once)."""

    def __init__(self) -> None:
        self.caps: dict[str, int] = {}


_pool_caps = _PoolCaps()


def pool_cap(settings: Settings, role: str) -> int:
    """Leases per role, model and host: ``XNAI_MODEL_POOL``, else the role's processes in the plan."""
    if settings.model_pool is not None:
        return settings.model_pool
    if role not in _pool_caps.caps:
        from xnai_tasks.plan.host import plan_for

        _pool_caps.caps[role] = plan_for(settings).roles[role].processes
    return _pool_caps.caps[role]


def guard(role: str, model: str, conn: redis.Redis | None = None, settings: Settings | None = None) -> Guard:
    """The guard of ``role``'s calls to ``model`` in this process (on the role's own Redis connection)."""
    from xnai_tasks.worker.memory_bank import connection

    current = settings or process_settings()
    return Guard(conn or connection(), current, role, model, cap=pool_cap(current, role))


def guarded(role: str, model: str, call: Callable[[], T]) -> T:
    """Run ``call`` (an LLM call of ``role`` to ``model``) behind the breaker and in a lease of the pool."""
    return guard(role, model).run(call)
