"""``xnai bench roundtrip``: no-op tasks through our app vs a plain Celery app, side by side in one run.

Three apps, three workers running at the same time on the same Redis with the same settings (prefork,
same concurrency, acks late, prefetch 1): ours (Ed25519-signed messages and results, the message gate),
plain Celery with JSON, and Celery's ``auth`` serializer (RSA-2048). Rounds alternate between the apps;
the median of each is reported, with the CPU each task cost the client (this process), the app's worker
(parent and pool) and the embedded Redis: where the client, the workers and Redis share the same cores, the
round-trip ratio follows the ratio of those totals.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from celery.result import AsyncResult

from xnai_tasks.bench.cpu_meter import CpuMeter
from xnai_tasks.bench.harness import host_facts, median, private_stack_home, worker_process
from xnai_tasks.bench.options import BenchOptions
from xnai_tasks.ops.redis_server import embedded_pid
from xnai_tasks.settings import MAX_QUEUE_LIMIT, Settings

Submit = Callable[[int], AsyncResult]
RESULT_TIMEOUT_S = 300.0
WARMUP_TASKS = 50
#: The process groups whose CPU each round measures.
CPU_GROUPS = ("client", "worker", "redis")


@dataclass(frozen=True)
class Round:
    """One round of one app: enqueue and round-trip tasks/s, and CPU microseconds per task by process group."""

    enqueue_per_s: float
    roundtrip_per_s: float
    cpu_us_per_task: dict[str, float]


def measure(submit: Submit, tasks: int) -> tuple[float, float]:
    """Enqueue ``tasks`` no-ops, then wait for every result: (enqueue tasks/s, round-trip tasks/s)."""
    start = time.perf_counter()
    results = [submit(i) for i in range(tasks)]
    enqueued = time.perf_counter()
    for i, result in enumerate(results):
        if result.get(timeout=RESULT_TIMEOUT_S) != i:
            raise AssertionError(f"task {i} returned a wrong value")
    done = time.perf_counter()
    return tasks / (enqueued - start), tasks / (done - start)


def run_roundtrip(settings: Settings, args: BenchOptions) -> dict[str, Any]:
    """Run the benchmark and return its report."""
    tasks, rounds, concurrency = args.tasks, args.rounds, args.concurrency
    with private_stack_home(settings) as bench:
        # Every task is queued at once: the queue cap's script still runs on each push, but refuses none.
        uncapped = replace(bench, max_queue=MAX_QUEUE_LIMIT, queue_caps=())
        runs = _measure_apps(uncapped, tasks, rounds, concurrency)
    summary = {name: _summary(values) for name, values in runs.items()}

    def ratio(app: str, base: str, what: str) -> float:
        return round(float(summary[app][f"{what}_per_s"]) / float(summary[base][f"{what}_per_s"]), 3)

    return {
        "benchmark": "roundtrip",
        "tasks": tasks,
        "rounds": rounds,
        "concurrency": concurrency,
        "apps": summary,
        "ratios": {
            "signed_vs_plain_roundtrip": ratio("signed", "plain", "roundtrip"),
            "signed_vs_plain_enqueue": ratio("signed", "plain", "enqueue"),
            "signed_vs_auth_roundtrip": ratio("signed", "auth", "roundtrip"),
            "signed_vs_auth_enqueue": ratio("signed", "auth", "enqueue"),
            "plain_vs_signed_cpu_per_task": round(
                summary["plain"]["cpu_us_per_task"]["total"] / summary["signed"]["cpu_us_per_task"]["total"], 3
            ),
        },
        "host": host_facts(),
    }


def _summary(values: list[Round]) -> dict[str, Any]:
    """An app's medians over its rounds (CPU: the median of each group, and of each round's total)."""
    cpu = {group: round(median([r.cpu_us_per_task.get(group, 0.0) for r in values])) for group in CPU_GROUPS}
    cpu["total"] = round(median([sum(r.cpu_us_per_task.values()) for r in values]))
    return {
        "enqueue_per_s": round(median([r.enqueue_per_s for r in values]), 1),
        "roundtrip_per_s": round(median([r.roundtrip_per_s for r in values]), 1),
        "cpu_us_per_task": cpu,
        "runs": [[round(r.enqueue_per_s, 1), round(r.roundtrip_per_s, 1)] for r in values],
    }


def _measure_apps(bench: Settings, tasks: int, rounds: int, concurrency: int) -> dict[str, list[Round]]:
    """Start the three workers side by side and measure each app ``rounds`` times, alternating."""
    from xnai_tasks.bench import auth_app, plain_app
    from xnai_tasks.client.sync import Client
    from xnai_tasks.core.celery_app import create_app
    from xnai_tasks.security import acl, redis_urls

    auth_dir = bench.home / "auth"
    auth_app.make_certificate(auth_dir)
    auth_env = {auth_app.AUTH_DIR_VARIABLE: str(auth_dir)}
    os.environ.update(auth_env)  # the auth app reads its certificate folder when first configured
    ours = Client(bench)
    plain, auth = plain_app.app, auth_app.app
    admin = redis_urls.connection_url(bench, acl.ADMIN)
    for baseline in (plain, auth):
        baseline.conf.update(broker_url=admin, result_backend=admin)
    common = [
        "--pool=prefork",
        f"--concurrency={concurrency}",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
    ]

    def celery_worker(module: str, queue: str, node: str) -> list[str]:
        return ["-m", "celery", "-A", module, "worker", f"-Q{queue}", f"-n{node}@%h", *common]

    control = create_app(bench, main="xnai_bench")
    workers = [  # (command, node name, the app that can ping it: the auth worker only accepts `auth` messages)
        (["-m", "xnai_tasks", "worker", "copilot", f"--concurrency={concurrency}"], "copilot", control),
        (celery_worker("xnai_tasks.bench.plain_app", plain_app.QUEUE, "plain"), "plain", plain),
        (celery_worker("xnai_tasks.bench.auth_app", auth_app.QUEUE, "auth"), "auth", auth),
    ]
    apps: dict[str, Submit] = {
        "signed": lambda i: ours.submit("copilot", "echo", value=i)._result,
        "plain": lambda i: plain.send_task("plain.noop", kwargs={"value": i}, queue=plain_app.QUEUE),
        "auth": lambda i: auth.send_task("auth.noop", kwargs={"value": i}, queue=auth_app.QUEUE),
    }
    runs: dict[str, list[Round]] = {name: [] for name in apps}
    with contextlib.ExitStack() as stack:
        meters, redis_pid, client = {}, embedded_pid(bench), {"client": os.getpid()}
        for (argv, node, pinger), name in zip(workers, apps, strict=True):
            proc = stack.enter_context(worker_process(argv, bench, pinger, node, auth_env))
            meters[name] = CpuMeter({"worker": proc.pid, "redis": redis_pid}, alone=client)
        for submit in apps.values():
            measure(submit, WARMUP_TASKS)
        for _ in range(rounds):
            for name, submit in apps.items():
                used: dict[str, float] = {}
                with meters[name].measuring(used):
                    enqueue, roundtrip = measure(submit, tasks)
                cpu = {group: seconds / tasks * 1e6 for group, seconds in used.items()}
                runs[name].append(Round(enqueue, roundtrip, cpu))
    ours.close()
    control.close()
    return runs
