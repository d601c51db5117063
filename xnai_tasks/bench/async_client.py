"""``xnai bench async``: 200 echo tasks awaited through the async client vs the sync client in a thread pool.

One copilot worker on a private Redis; rounds alternate between the two ways. Both have the same number of
tasks out at once (:data:`IN_FLIGHT`): the async client's ``max_in_flight``, the thread pool's size. The
figure is the time from the first submit to the last verified result, and the CPU time this (client) process
spent meanwhile; the ratios are the medians of each round's async / threads (rounds are paired: the load of a
shared machine drifts between rounds more than between the two halves of one).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import anyio

from xnai_tasks.bench.harness import host_facts, median, private_stack_home, worker_process
from xnai_tasks.bench.options import BenchOptions
from xnai_tasks.settings import Settings

if TYPE_CHECKING:
    from xnai_tasks.client.sync import Client

#: Echo tasks per measurement.
TASKS = 200
#: Tasks out at once, in both ways.
IN_FLIGHT = 64
#: Tasks run once through each before measuring.
WARMUP_TASKS = 20
RESULT_TIMEOUT_S = 300.0
ROLE = "copilot"


def run_async_bench(settings: Settings, args: BenchOptions) -> dict[str, Any]:
    """Run the benchmark and return its report."""
    with private_stack_home(settings) as bench:
        runs = _measure(bench, args.rounds, args.concurrency)
    seconds = {name: median([wall for wall, _ in values]) for name, values in runs.items()}
    cpu = {name: median([used for _, used in values]) for name, values in runs.items()}

    def paired(index: int) -> float:
        return round(median([a[index] / t[index] for a, t in zip(runs["async"], runs["threads"], strict=True)]), 3)

    return {
        "benchmark": "async",
        "tasks": TASKS,
        "in_flight": IN_FLIGHT,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "ways": {
            name: {
                "seconds": round(seconds[name], 3),
                "tasks_per_s": round(TASKS / seconds[name], 1),
                "client_cpu_s": round(cpu[name], 3),
                "runs": [[round(wall, 3), round(used, 3)] for wall, used in values],
            }
            for name, values in runs.items()
        },
        "ratios": {"async_vs_threads_seconds": paired(0), "async_vs_threads_client_cpu_seconds": paired(1)},
        "host": host_facts(),
    }


def _measure(bench: Settings, rounds: int, concurrency: int) -> dict[str, list[tuple[float, float]]]:
    from xnai_tasks.client.sync import Client
    from xnai_tasks.core.celery_app import create_app

    control = create_app(bench, main="xnai_bench_async")
    client = Client(bench)
    argv = ["-m", "xnai_tasks", "worker", ROLE, f"--concurrency={concurrency}"]
    runs: dict[str, list[tuple[float, float]]] = {"async": [], "threads": []}
    try:
        with worker_process(argv, bench, control, ROLE), ThreadPoolExecutor(IN_FLIGHT) as pool:
            anyio.run(_async_round, bench, WARMUP_TASKS)
            _threads_round(client, pool, WARMUP_TASKS)
            for _ in range(rounds):
                runs["async"].append(anyio.run(_async_round, bench, TASKS))
                runs["threads"].append(_threads_round(client, pool, TASKS))
    finally:
        client.close()
        control.close()
    return runs


async def _async_round(bench: Settings, tasks: int) -> tuple[float, float]:
    """Seconds and client CPU seconds to submit and await ``tasks`` echoes in one event loop (connecting the
    client not counted)."""
    from xnai_tasks.client.asynchronous import AsyncClient

    values: dict[int, Any] = {}
    async with AsyncClient(bench, max_in_flight=IN_FLIGHT) as client:

        async def one(i: int) -> None:
            values[i] = await (await client.submit(ROLE, "echo", value=i)).get()

        start, cpu = time.perf_counter(), time.process_time()
        with anyio.fail_after(RESULT_TIMEOUT_S):
            async with anyio.create_task_group() as group:
                for i in range(tasks):
                    group.start_soon(one, i)
        elapsed, used = time.perf_counter() - start, time.process_time() - cpu
    _check(values, tasks)
    return elapsed, used


def _threads_round(client: Client, pool: ThreadPoolExecutor, tasks: int) -> tuple[float, float]:
    """Seconds and client CPU seconds to submit and wait for ``tasks`` echoes, each in a thread of ``pool``."""

    def one(i: int) -> Any:
        return client.submit(ROLE, "echo", value=i).get(timeout=RESULT_TIMEOUT_S)

    start, cpu = time.perf_counter(), time.process_time()
    values = dict(enumerate(pool.map(one, range(tasks))))
    elapsed, used = time.perf_counter() - start, time.process_time() - cpu
    _check(values, tasks)
    return elapsed, used


def _check(values: dict[int, Any], tasks: int) -> None:
    if values != {i: i for i in range(tasks)}:
        raise AssertionError("an echo task returned a wrong value")
