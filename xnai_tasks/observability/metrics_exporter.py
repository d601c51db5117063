"""``xnai metrics``: the Prometheus endpoint on 127.0.0.1:XNAI_METRICS_PORT, a process of its own.

At each scrape it sums the workers' multiprocess files (:mod:`xnai_tasks.observability.metrics`) and reads what
lives in Redis: queue depths over every priority list, the gate's refusal counters per reason (also the
``refused`` outcome of ``xnai_tasks_total``, with ``task="unverified"``: a refused message's task name is not
trusted), recent worker deaths, a 0 under ``xnai_model_loaded`` for each model its probe found unusable; workers
online by signed ``ping`` (cached a few seconds); the PSS of each role's worker processes on this host. Nothing is
kept here, so a restart loses nothing. Before each scrape the live gauges of processes that no longer exist go.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psutil
import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import CollectorRegistry

from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.observability.metrics import OUTCOME_REFUSED, prune_dead
from xnai_tasks.security.refusal import Reason
from xnai_tasks.settings import Settings

#: Seconds a ``ping`` answer is reused (a scrape must not wait on every worker each time).
ONLINE_CACHE_S = 5.0
PING_TIMEOUT_S = 0.5
REFUSED_TASK_LABEL = "unverified"


class XnaiCollector:
    """The multiprocess counts of the workers plus what Redis and this host know, collected at scrape time."""

    def __init__(self, settings: Settings, conn: redis.Redis, app: Any) -> None:
        self.settings = settings
        self.conn = conn
        self.app = app
        self.files = MultiProcessCollector(None, path=str(settings.metrics_dir))  # type: ignore[no-untyped-call]
        self._online: tuple[float, dict[str, list[str]]] = (0.0, {})

    def collect(self) -> Iterator[Metric]:
        refused = {role: self._refusals(role) for role in c.ROLES}
        prune_dead(self.settings.metrics_dir)
        tasks_seen = loaded_seen = False
        for family in self.files.collect():  # type: ignore[no-untyped-call]
            if family.name == c.METRIC_TASKS.removesuffix("_total"):
                tasks_seen = True
                self._add_refused(family, refused)
            if family.name == c.METRIC_MODEL_LOADED:
                loaded_seen = True
                self._add_unavailable(family)
            yield family
        if not loaded_seen:
            family = GaugeMetricFamily(c.METRIC_MODEL_LOADED, "Models loaded", labels=["role", "model"])
            self._add_unavailable(family)
            yield family
        if not tasks_seen:
            family = CounterMetricFamily(
                c.METRIC_TASKS.removesuffix("_total"),
                "Tasks by role, task and outcome",
                labels=["role", "task", "outcome"],
            )
            self._add_refused(family, refused)
            yield family
        yield from self._redis_families(refused)
        yield from self._breaker_families()
        yield from self._cache_families()
        yield self._online_family()
        yield self._pss_family()

    @staticmethod
    def _add_refused(family: Metric, refused: dict[str, dict[str, int]]) -> None:
        for role, reasons in refused.items():
            total = sum(n for reason, n in reasons.items() if reason != Reason.WORKER_LOST)
            family.add_sample(
                c.METRIC_TASKS,
                {"role": role, "task": REFUSED_TASK_LABEL, "outcome": OUTCOME_REFUSED},
                float(total),
            )

    def _add_unavailable(self, family: Metric) -> None:
        """A 0 for each model a role's probe found unusable here, unless a live process reports it."""
        from xnai_tasks.observability.status import model_verdicts

        present = {(s.labels.get("role"), s.labels.get("model")) for s in family.samples}
        for role in c.ROLES:
            for model, verdict in model_verdicts(self.conn, role).items():
                if isinstance(verdict, dict) and verdict.get("unavailable") and (role, model) not in present:
                    family.add_sample(c.METRIC_MODEL_LOADED, {"role": role, "model": model}, 0.0)

    def _refusals(self, role: str) -> dict[str, int]:
        known = {r.value for r in Reason}
        raw = self.conn.hgetall(c.refused_counter_key(role))
        counts = {_text(k): int(v) for k, v in raw.items()}
        return {reason: n for reason, n in counts.items() if reason in known}

    def _redis_families(self, refused: dict[str, dict[str, int]]) -> Iterator[Metric]:
        from xnai_tasks.observability.status import recent_deaths

        depth = GaugeMetricFamily(c.METRIC_QUEUE_DEPTH, "Messages waiting, all priorities", labels=["role"])
        counts = CounterMetricFamily(
            c.METRIC_REFUSED.removesuffix("_total"), "Messages refused, by reason", labels=["role", "reason"]
        )
        deaths = GaugeMetricFamily(
            c.METRIC_WORKER_DEATHS, "Worker-process deaths in the last 10 minutes", labels=["role"]
        )
        for role in c.ROLES:
            depth.add_metric([role], broker.queue_depth(self.conn, c.queue_for(role)))
            for reason in sorted({r.value for r in Reason} | set(refused[role])):
                counts.add_metric([role, reason], refused[role].get(reason, 0))
            deaths.add_metric([role], recent_deaths(self.conn, role)["last_10m"])
        yield from (depth, counts, deaths)

    def _breaker_families(self) -> Iterator[Metric]:
        """Each circuit breaker's state and its transitions, as counted in Redis by its scripts."""
        from xnai_tasks.resilience.breaker import STATE_VALUES, all_states

        state = GaugeMetricFamily(
            c.METRIC_BREAKER_STATE, "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=["role", "model"]
        )
        moves = CounterMetricFamily(
            c.METRIC_BREAKER_TRANSITIONS.removesuffix("_total"),
            "Circuit breaker transitions, by the state entered",
            labels=["role", "model", "state"],
        )
        for found in all_states(self.conn):
            state.add_metric([found.role, found.model], STATE_VALUES[found.state])
            for entered, count in found.transitions.items():
                moves.add_metric([found.role, found.model, entered], count)
        yield from (state, moves)

    def _cache_families(self) -> Iterator[Metric]:
        """The response cache's outcomes per role (xnai_tasks/cache/store.py counts them in Redis) and its bytes."""
        from xnai_tasks.cache.store import stats

        outcomes = CounterMetricFamily(
            c.METRIC_CACHE.removesuffix("_total"), "Response cache outcomes", labels=["role", "outcome"]
        )
        size = GaugeMetricFamily(c.METRIC_CACHE_BYTES, "Bytes of cached responses", labels=["role"])
        for row in stats(self.conn, self.settings.cache_max_mb << 20):
            for outcome, n in sorted(row.counts.items()):
                if outcome != "lookup":
                    outcomes.add_metric([row.role, outcome], n)
            size.add_metric([row.role], row.bytes)
        yield from (outcomes, size)

    def _online_family(self) -> Metric:
        from xnai_tasks.core.nodes import workers_online

        at, online = self._online
        if time.monotonic() - at > ONLINE_CACHE_S:
            with contextlib.suppress(Exception):  # a broker hiccup shows as no worker, not as a failed scrape
                online = workers_online(self.app, timeout=PING_TIMEOUT_S)
            self._online = (time.monotonic(), online)
        family = GaugeMetricFamily(c.METRIC_WORKERS_ONLINE, "Workers answering a signed ping", labels=["role"])
        for role in c.ROLES:
            family.add_metric([role], len(online.get(role, [])))
        return family

    def _pss_family(self) -> Metric:
        family = GaugeMetricFamily(
            c.METRIC_PSS, "Proportional set size of the role's worker processes on this host", labels=["role"]
        )
        for role, total in worker_pss(self.settings).items():
            family.add_metric([role], total)
        return family


def worker_pss(settings: Settings) -> dict[str, int]:
    """PSS bytes per role: each ``xnai worker ROLE`` of this XNAI_HOME and its pool children."""
    totals = dict.fromkeys(c.ROLES, 0)
    home = str(settings.home)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        role = _worker_role(cmd)
        if role is None:
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("XNAI_HOME") not in (home, None):
                continue
            for member in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    totals[role] += int(getattr(member.memory_full_info(), "pss", 0))
    return totals


def _worker_role(cmdline: list[str]) -> str | None:
    for index, word in enumerate(cmdline[:-1]):
        if word == "worker" and cmdline[index + 1] in c.ROLES and "xnai_tasks" in " ".join(cmdline[:index]):
            return cmdline[index + 1]
    return None


def make_registry(settings: Settings, conn: redis.Redis, app: Any) -> CollectorRegistry:
    """A registry with only our collector (no process or platform metrics: they would name this process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(XnaiCollector(settings, conn, app))
    return registry


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
