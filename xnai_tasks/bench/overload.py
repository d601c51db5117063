"""``xnai bench overload``: offer three times what the roles can do for a minute, with load shedding on.

A private stack (embedded Redis with its ACLs, one worker of one pool process per worker role, no model used:
the probe task ``echo`` with a fixed delay stands for a slow task). First the capacity of each role is measured
with a short burst; each role's queue cap is then what the role works through in half the SLO (Little's law,
so an accepted request waits at most about half its SLO). Then requests are offered in an open loop at
``factor`` times the measured capacity, round-robin over the roles, each expiring after the SLO (a caller who
waits that long). Figures: accepted requests' latency (submit to verified result) p50/p99 and the share within
the SLO, goodput against capacity, refused submits with their retry-after distribution, requests expired unrun,
errors, and lost (accepted but never ended: 0 when nothing is dropped silently).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

from celery import states

from xnai_tasks.bench.harness import host_facts, private_stack_home, start_worker, stop_worker, wait_online
from xnai_tasks.bench.options import BenchOptions, OverloadOptions
from xnai_tasks.client.sync import Client, TaskHandle
from xnai_tasks.core import constants as c
from xnai_tasks.errors import OverloadedError, RefusedError, XnaiError
from xnai_tasks.observability.report import percentile
from xnai_tasks.settings import Settings

#: Requests per role in the capacity burst.
CAPACITY_BURST = 12
#: How often the accepted requests are checked for a result (the latencies' resolution; each check reads Redis).
POLL_EVERY_S = 0.2
#: Seconds past the SLO the accepted requests get to end once the offer stops; what has not ended then is lost.
DRAIN_MARGIN_S = 30.0
#: Edges of the retry-after histogram, seconds.
RETRY_EDGES = (1, 2, 5, 10, 30, 60)
#: The workers' environment: no model is loaded or probed (echo uses none).
WORKER_ENV = {"XNAI_MODEL_MODE": "lazy", "XNAI_LLM_SAFE": "off", "XNAI_TELEMETRY_DAYS": "0"}


@dataclass
class Pending:
    """An accepted request waiting for its result."""

    handle: TaskHandle
    submitted: float


@dataclass
class Tally:
    """What became of the offered requests."""

    offered: int = 0
    accepted: int = 0
    completed: int = 0
    expired: int = 0
    errors: int = 0
    refused_other: int = 0
    latencies: list[float] = field(default_factory=list)
    retry_after: list[float] = field(default_factory=list)


@contextmanager
def overload_stack(settings: Settings) -> Iterator[Settings]:
    """A private home with Redis and one single-process worker per worker role, online."""
    from xnai_tasks.core.celery_app import create_app

    with private_stack_home(settings) as bench, ExitStack() as stack:
        control = create_app(bench, main="xnai_bench_overload")
        stack.callback(control.close)
        for role in c.WORKER_ROLES:
            proc = start_worker(bench, role, concurrency=1, env=WORKER_ENV)
            stack.callback(stop_worker, proc)
            wait_online(proc, control, role)
        yield bench


def measure_capacity(client: Client, delay_s: float) -> dict[str, float]:
    """Requests/s each worker role completes, from a burst of :data:`CAPACITY_BURST` each, all roles at once."""
    start = time.monotonic()
    handles = {
        role: [client.submit(role, "echo", delay_s=delay_s) for _ in range(CAPACITY_BURST)] for role in c.WORKER_ROLES
    }
    rates = {}
    for role, batch in handles.items():
        for handle in batch:
            handle.get(timeout=120)
        rates[role] = round(CAPACITY_BURST / (time.monotonic() - start), 3)
    return rates


def queue_caps(capacity: dict[str, float], slo_s: float) -> dict[str, int]:
    """Each role's cap: what it works through in half the SLO, at least one."""
    return {role: max(1, int(rate * slo_s / 2)) for role, rate in capacity.items()}


def offer(client: Client, rate: float, duration: float, options: OverloadOptions, tally: Tally) -> None:
    """The open loop: one request every ``1/rate`` s, round-robin over the roles, for ``duration`` s; then the drain."""
    pending: list[Pending] = []
    start = time.monotonic()
    next_at = next_poll = start
    while (now := time.monotonic()) < start + duration:
        if now >= next_at:
            role = c.WORKER_ROLES[tally.offered % len(c.WORKER_ROLES)]
            _submit(client, role, options, tally, pending)
            next_at += 1 / rate
        if now >= next_poll:
            pending = _collect(pending, tally)
            next_poll = now + POLL_EVERY_S
        time.sleep(max(0.0, min(next_at, next_poll) - time.monotonic()))
    deadline = time.monotonic() + options.slo_s + DRAIN_MARGIN_S
    while pending and time.monotonic() < deadline:
        pending = _collect(pending, tally)
        time.sleep(POLL_EVERY_S)


def _submit(client: Client, role: str, options: OverloadOptions, tally: Tally, pending: list[Pending]) -> None:
    tally.offered += 1
    submitted = time.monotonic()
    try:
        handle = client.submit(role, "echo", delay_s=options.delay_s, expires_s=options.slo_s)
    except OverloadedError as refused:
        tally.retry_after.append(refused.retry_after_s)
        return
    tally.accepted += 1
    pending.append(Pending(handle, submitted))


def _collect(pending: list[Pending], tally: Tally) -> list[Pending]:
    """Record the requests that ended; the others still wait."""
    waiting = []
    for item in pending:
        if item.handle.state not in states.READY_STATES:
            waiting.append(item)
            continue
        ended = time.monotonic()
        try:
            item.handle.get(timeout=10)
            tally.completed += 1
            tally.latencies.append(ended - item.submitted)
        except RefusedError as refused:
            if "deadline" in str(refused):
                tally.expired += 1
            else:
                tally.refused_other += 1
        except XnaiError:
            tally.errors += 1
    return waiting


def _pct(values: list[float], p: float) -> float | None:
    value = percentile(values, p)
    return None if value is None else round(value, 3)


def _histogram(values: list[float]) -> dict[str, int]:
    """Counts of retry-after values per bin (``1-2s``: over 1, at most 2)."""
    edges = (0, *RETRY_EDGES)
    bins = {f"{low:g}-{high:g}s": sum(low < v <= high for v in values) for low, high in pairwise(edges)}
    bins[f">{RETRY_EDGES[-1]:g}s"] = sum(v > RETRY_EDGES[-1] for v in values)
    return bins


def figures(tally: Tally, capacity_rps: float, window_s: float, slo_s: float) -> dict[str, Any]:
    """The report's figures from the tally."""
    within = [v for v in tally.latencies if v <= slo_s]
    goodput = len(within) / window_s if window_s else 0.0
    ended = tally.completed + tally.expired + tally.errors + tally.refused_other
    return {
        "offered": tally.offered,
        "offered_per_s": round(tally.offered / window_s, 2) if window_s else None,
        "accepted": tally.accepted,
        "completed": tally.completed,
        "accepted_p50_s": _pct(tally.latencies, 50),
        "accepted_p99_s": _pct(tally.latencies, 99),
        "within_slo": len(within),
        "refused": len(tally.retry_after),
        "retry_after_s": {
            "p50": _pct(tally.retry_after, 50),
            "p90": _pct(tally.retry_after, 90),
            "max": max(tally.retry_after, default=None),
            "histogram": _histogram(tally.retry_after),
        },
        "expired": tally.expired,
        "errors": tally.errors,
        "refused_after_accept": tally.refused_other,
        "lost": tally.accepted - ended,
        "goodput_per_s": round(goodput, 3),
        "ratios": {
            "goodput_vs_capacity": round(goodput / capacity_rps, 3) if capacity_rps else None,
            "within_slo_share": round(len(within) / tally.completed, 3) if tally.completed else None,
        },
    }


def run_overload(settings: Settings, _: BenchOptions, options: OverloadOptions | None = None) -> dict[str, Any]:
    """``xnai bench overload``: capacity, then ``factor`` x capacity offered for ``duration`` s; the figures."""
    options = options or OverloadOptions()
    with overload_stack(settings) as bench:
        probe = Client(bench)
        try:
            capacity = measure_capacity(probe, options.delay_s)
        finally:
            probe.close()
        caps = queue_caps(capacity, options.slo_s)
        client = Client(replace(bench, queue_caps=tuple(caps.items())))
        tally = Tally()
        total = sum(capacity.values())
        try:
            start = time.monotonic()
            offer(client, options.factor * total, options.duration, options, tally)
            window_s = time.monotonic() - start
        finally:
            client.close()
    result = figures(tally, total, window_s, options.slo_s)
    return {
        "benchmark": "overload",
        "host": host_facts(),
        "options": {
            "duration_s": options.duration,
            "factor": options.factor,
            "slo_s": options.slo_s,
            "task": f"echo(delay_s={options.delay_s:g}), one pool process per role",
            "roles": list(c.WORKER_ROLES),
        },
        "capacity_per_s": capacity,
        "capacity_total_per_s": round(total, 3),
        "queue_caps": caps,
        "window_s": round(window_s, 2),
        "percentiles": "nearest-rank",
        **result,
    }
