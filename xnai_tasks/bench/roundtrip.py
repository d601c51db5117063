"""``xnai bench roundtrip``: no-op tasks through our app vs a plain Celery app, side by side in one run.

Both workers run at the same time on the same Redis with the same settings (prefork, same concurrency,
acks late, prefetch 1). Rounds alternate between the apps; the median of each is reported.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from celery.result import AsyncResult

from xnai_tasks.bench.harness import host_facts, median, private_stack_home, worker_process
from xnai_tasks.settings import Settings

Submit = Callable[[int], AsyncResult]
RESULT_TIMEOUT_S = 300.0
WARMUP_TASKS = 50


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


def run_roundtrip(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return its report."""
    from xnai_tasks.bench import plain_app
    from xnai_tasks.celery_app import create_app
    from xnai_tasks.client import Client

    tasks, rounds, concurrency = int(args.tasks), int(args.rounds), int(args.concurrency)
    with private_stack_home(settings) as bench:
        ours = Client(bench)
        plain = plain_app.app
        plain.conf.update(broker_url=bench.broker_url, result_backend=bench.broker_url)
        ours_worker = ["-m", "xnai_tasks", "worker", "copilot", f"--concurrency={concurrency}"]
        plain_worker = [
            "-m", "celery", "-A", "xnai_tasks.bench.plain_app", "worker", f"--queues={plain_app.QUEUE}",
            "--hostname=plain@%h", f"--concurrency={concurrency}", "--pool=prefork", "--loglevel=WARNING",
            "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        control = create_app(bench, main="xnai_bench")
        apps: dict[str, Submit] = {
            "signed": lambda i: ours.submit("copilot", "echo", value=i)._result,
            "plain": lambda i: plain.send_task("plain.noop", kwargs={"value": i}, queue=plain_app.QUEUE),
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
        with (
            worker_process(ours_worker, bench, control, "copilot"),
            worker_process(plain_worker, bench, control, "plain"),
        ):
            for submit in apps.values():
                measure(submit, WARMUP_TASKS)
            for _ in range(rounds):
                for name, submit in apps.items():
                    runs[name].append(measure(submit, tasks))
        ours.close()
        control.close()
    summary: dict[str, dict[str, Any]] = {
        name: {
            "enqueue_per_s": round(median([r[0] for r in values]), 1),
            "roundtrip_per_s": round(median([r[1] for r in values]), 1),
            "runs": [[round(e, 1), round(t, 1)] for e, t in values],
        }
        for name, values in runs.items()
    }
    signed, base = summary["signed"], summary["plain"]
    return {
        "benchmark": "roundtrip",
        "tasks": tasks,
        "rounds": rounds,
        "concurrency": concurrency,
        "apps": summary,
        "ratios": {
            "signed_vs_plain_roundtrip": round(signed["roundtrip_per_s"] / base["roundtrip_per_s"], 3),
            "signed_vs_plain_enqueue": round(signed["enqueue_per_s"] / base["enqueue_per_s"], 3),
        },
        "host": host_facts(),
    }
