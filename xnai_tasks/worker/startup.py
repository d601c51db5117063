"""Worker start-up: apply the role's plan (CPU set, concurrency, threads) and make its models ready.

Connected to Celery's signals when the app is imported, so ``xnai worker grok`` and plain
``celery -A xnai_tasks worker -Q grok`` behave the same:

* ``celeryd_init``: remember whether the command line named a concurrency.
* ``worker_init`` (the worker parent, before the pool forks): compute the plan for the role
  (:func:`xnai_tasks.plan.host.plan_for`), pin every thread of the process to the role's CPUs (the pool
  children inherit the mask), set the concurrency when none was given, resolve and verify the models
  (a missing, truncated or wrong-checksum model is one error line and exit code 1, never a crash in a
  task), probe each LLM in a separate process (:mod:`xnai_tasks.models.probe`: which load options run on
  this CPU, or why none does), then preload them (no inference here: llama.cpp's OpenMP pool would hang
  the children) and ``gc.freeze()``, or leave them to be loaded lazily in the children.
* ``celeryd_after_setup``: ``gc.freeze()`` once more, right before the pool forks.
* ``worker_process_init`` (each pool child): llama.cpp and torch threads from the plan.

Tasks reach their models through :func:`registry`; ``health`` reports :func:`describe`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from xnai_tasks.errors import BrokerUnreachableError, XnaiError
from xnai_tasks.models import prompt_cache
from xnai_tasks.models.holder import ModelHolder
from xnai_tasks.models.inference import Generation
from xnai_tasks.models.loading import LLM, set_encoder_threads, set_llm_threads
from xnai_tasks.models.registry import ModelRegistry
from xnai_tasks.plan.host import plan_for
from xnai_tasks.plan.planner import RolePlan, for_concurrency
from xnai_tasks.settings import Settings, process_settings
from xnai_tasks.worker.role import current_role, signing_problem
from xnai_tasks.worker.timer import Timer

log = logging.getLogger(__name__)

_MiB = 1024 * 1024
T = TypeVar("T")


class _State:
    """What this process knows about its role: the plan as applied, the model registries."""

    def __init__(self) -> None:
        self.explicit_concurrency: Any = None
        self.role: str | None = None
        self.role_plan: RolePlan | None = None
        self.registries: dict[str, ModelRegistry] = {}


_state = _State()


def role_plan() -> RolePlan | None:
    """The plan this worker applied (None outside a role worker)."""
    return _state.role_plan


def registry(role: str) -> ModelRegistry:
    """The models of ``role`` in this process.

    A role worker made its registry at start. A process serving several roles' queues (a worker
    started without ``-Q``) or a tool builds one here on first use, in lazy mode: it runs after the fork.
    """
    found = _state.registries.get(role)
    if found is None:
        current = process_settings()
        plan = plan_for(current).roles[role]
        if plan.model_mode == "preload":
            plan = replace(plan, model_mode="lazy")
        found = _make_registry(role, current, plan)
        probe_models(role, current, plan, found)
        _state.registries[role] = found
    return found


def current_registry_role() -> str | None:
    """The role whose models this worker process holds (None outside a role worker)."""
    return _state.role


def describe(role: str) -> list[dict[str, Any]]:
    """What the ``health`` task reports: each model's name, kind, mode, loaded or not, sizes, threads."""
    found = _state.registries.get(role)
    if found is None:
        return []
    from xnai_tasks.batching import runtime as batching

    plan = _state.role_plan if _state.role == role else None
    threads = plan.threads_per_process if plan is not None else None
    entries = [{**entry, "threads": threads} for entry in found.describe()]
    process = batching.encoder_process()
    for entry in entries:
        if process is not None and entry["kind"] == "encoder":  # a batching worker: the encoder runs there
            entry["encoder_process"] = process.describe()
    return entries


@contextmanager
def using(holder: ModelHolder[T], timer: Timer) -> Iterator[T]:
    """The holder's model for the block; a load this causes is timed as the ``load`` phase."""
    if not holder.loaded:
        with timer.phase("load"):
            holder.load()
    with holder.use() as value:
        yield value


def generation_report(holder: ModelHolder[LLM], out: Generation, timer: Timer) -> dict[str, Any]:
    """The fields every LLM task returns: model, prompt format, token counts, finish reason, timings, prompt cache."""
    timings = timer.as_dict()
    generate_s = timings.get("generate_s", 0.0)
    return {
        "model": holder.model.name,
        "pid": os.getpid(),
        "prompt_format": str(holder.model.params.get("prompt_format", "chat")),
        "prompt_tokens": out["prompt_tokens"],
        "completion_tokens": out["completion_tokens"],
        "finish_reason": out["finish_reason"],
        "timings": timings | {"tokens_per_s": round(out["completion_tokens"] / max(generate_s, 1e-9), 1)},
        "prompt_cache": prompt_cache.report(holder.get()) if holder.loaded else None,
    }


def start_role(role: str, concurrency: int | None, *, lazy_models: bool = False) -> tuple[RolePlan, ModelRegistry]:
    """Apply the plan and make the models ready in this (parent) process; return the plan as applied.

    ``lazy_models``: load a model here only when something in this process asks for it (a batching worker,
    whose encoder calls go to its encoder process).
    """
    current = process_settings()
    applied = for_concurrency(plan_for(current).roles[role], concurrency, current.threads)
    if lazy_models:
        applied = replace(applied, model_mode="lazy")
    pin_cpus(applied.cpus)
    if applied.threads > len(applied.cpus):
        log.warning(
            "%s: %d processes x %d threads oversubscribe its %d CPUs (XNAI_THREADS / --concurrency)",
            role,
            applied.processes,
            applied.threads_per_process,
            len(applied.cpus),
        )
    found = _make_registry(role, current, applied)
    probe_models(role, current, applied, found)
    _state.role, _state.role_plan = role, applied
    _state.registries[role] = found
    if applied.model_mode == "preload":
        found.preload()  # loads, then gc.freeze(); no inference in this process
    log.info(
        "%s: %d processes x %d threads on CPUs %s, models %s (%s)",
        role,
        applied.processes,
        applied.threads_per_process,
        applied.cpus,
        ", ".join(f"{h.model.name}" for h in found.holders()) or "none",
        applied.model_mode,
        extra={"event": "role_started", "role": role},
    )
    return applied, found


def require_broker() -> None:
    """Raise :class:`BrokerUnreachableError` unless this worker's Redis answers (the embedded one may be starting)."""
    from xnai_tasks.core import broker

    current = process_settings()
    broker.require_reachable(current, wait_s=broker.startup_wait_s(current))


def probe_models(role: str, current: Settings, plan: RolePlan, found: ModelRegistry) -> None:
    """Probe each LLM the role serves in a separate process; serve with what works, or mark it unavailable."""
    from xnai_tasks.models.probe import probe_llm

    for holder in found.holders():
        if holder.model.kind != "gguf" or holder.mode == "none":
            continue
        verdict = probe_llm(current, holder.model, plan.threads_per_process)
        holder.apply_probe(verdict.as_dict())
        level = logging.INFO if verdict.usable else logging.ERROR
        log.log(
            level,
            "%s: LLM %s %s%s",
            role,
            holder.model.name,
            verdict.reason,
            " (remembered)" if verdict.cached else "",
            extra={"event": "llm_probe", "role": role, "status": verdict.status},
        )


def publish_verdicts(redis_url: str, role: str) -> None:
    """Tell ``xnai status`` how this role's models fared in their probe (one hash per role in Redis)."""
    from xnai_tasks.core import broker
    from xnai_tasks.core import constants as c

    found = _state.registries.get(role)
    if found is None:
        return
    fields = {
        holder.model.name: json.dumps(
            {
                "kind": holder.model.kind,
                "sha256": holder.model.sha256,  # the response cache keys answers by it (xnai_tasks/cache)
                "probe": holder.probe,
                "load_options": holder.load_options,
                "unavailable": holder.unavailable,
            }
        )
        for holder in found.holders()
    }
    if not fields:
        return
    conn = broker.connect(redis_url, timeout=3.0)
    try:
        pipe = conn.pipeline(transaction=True)
        pipe.delete(c.model_verdicts_key(role))
        pipe.hset(c.model_verdicts_key(role), mapping=fields)
        pipe.execute()
    except Exception as exc:  # status shows less; the worker still serves
        log.warning("%s: could not publish model verdicts: %s", role, exc)
    finally:
        conn.close()


def record_encoder_death(redis_url: str, role: str, ended: str) -> None:
    """List an ended encoder process among the role's worker deaths (``xnai status``); a failure is only logged."""
    from xnai_tasks.core import broker
    from xnai_tasks.observability.deaths import push_death

    try:
        conn = broker.connect(redis_url, timeout=3.0)
        try:
            pipe = conn.pipeline(transaction=False)
            push_death(pipe, role, task=f"{role} encoder", ident=str(os.getpid()), cause=f"encoder process {ended}")
            pipe.execute()
        finally:
            conn.close()
    except Exception as exc:  # status shows less; the worker still serves
        log.warning("%s: could not record the encoder process's end: %s", role, exc)


def pin_cpus(cpus: list[int]) -> None:
    """Pin every thread of this process to ``cpus``; threads and processes started later inherit it."""
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError as exc:  # a thread that just ended, or a CPU this process may not use
            if tid in (0, os.getpid()):
                raise XnaiError(f"cannot pin this worker to CPUs {cpus}: {exc.strerror}") from None


def _make_registry(role: str, current: Settings, plan: RolePlan) -> ModelRegistry:
    cap = current.model_ram_mb * _MiB if current.model_ram_mb is not None else None
    return ModelRegistry.for_role(role, current, plan, keep_alive=current.keep_alive, ram_cap_bytes=cap)


def _given_concurrency(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    return None


def _fatal(role: str, exc: BaseException, exit_code: int = 1) -> None:
    """One clear line on stderr and in the log, then the worker exits (``exit_code``) before it forks."""
    line = f"xnai worker {role}: cannot start: {exc}"
    log.error(line, extra={"event": "worker_start_failed", "role": role})
    handlers = logging.getLogger().handlers
    # With no handler at all, logging's last resort already wrote the line to stderr.
    if handlers and not any(getattr(h, "stream", None) is sys.stderr for h in handlers):
        print(line, file=sys.stderr, flush=True)
    raise SystemExit(exit_code)


# ---------------------------------------------------------------- signal handlers (connected by core.signal_handlers)


def remember_options(sender: str | None = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    _state.explicit_concurrency = (options or {}).get("concurrency")


def on_worker_init(sender: Any = None, **_: Any) -> None:
    role = current_role()
    if role is None:
        return
    given = _given_concurrency(_state.explicit_concurrency)
    if given is None and sender is not None:
        given = _given_concurrency(sender.app.conf.worker_concurrency)
    try:
        require_broker()  # before the models load: a dead broker is one line and exit 6, not 100 retries
    except BrokerUnreachableError as exc:
        _fatal(role, exc, exc.exit_code)
        return
    problem = signing_problem()  # a revoked or missing key: one line now, not a worker whose every result fails
    if problem is not None:
        _fatal(role, problem, problem.exit_code)
        return
    from xnai_tasks.batching import runtime as batching
    from xnai_tasks.batching.encoder_process import EncoderProcess

    # a batching worker (XNAI_BATCH) is one process whose pool threads are task threads, not processes
    threaded = batching.batches(process_settings(), role) and batching.is_thread_pool(sender)
    try:
        applied = start_role(role, 1 if threaded else given, lazy_models=threaded)[0]
    except XnaiError as exc:
        _fatal(role, exc)
        return
    if sender is not None and given is None and _state.explicit_concurrency != "auto" and not threaded:
        sender.concurrency = applied.processes
    if sender is not None:
        publish_verdicts(str(sender.app.conf.broker_url), role)
    if threaded:
        model = registry(batching.BATCHED_ROLE).encoder.model
        encoder = EncoderProcess(
            model.path,
            threads=applied.threads_per_process,
            max_length=model.max_length,
            label=f"{role} encoder",
            on_death=partial(record_encoder_death, str(sender.app.conf.broker_url), role)
            if sender is not None
            else None,
        )
        try:
            batching.start(process_settings(), encoder)  # waits until the encoder process has loaded the model
        except XnaiError as exc:
            _fatal(role, exc)


def freeze_before_fork(**_: Any) -> None:
    if _state.role_plan is not None and _state.role_plan.model_mode == "preload":
        gc.collect()
        gc.freeze()


def on_child_start(**_: Any) -> None:
    plan, role = _state.role_plan, _state.role
    if plan is None or role is None:
        return
    threads = plan.threads_per_process
    found = _state.registries.get(role)
    for holder in found.holders() if found is not None else []:
        if holder.loaded and holder.model.kind == "gguf":
            set_llm_threads(holder.get(), threads)
    if "torch" in sys.modules:
        set_encoder_threads(threads)
