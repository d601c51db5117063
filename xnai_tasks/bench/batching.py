"""``xnai bench batching``: one-text ``curation.embed`` tasks on a batching worker vs the same worker unbatched.

Each side is a fresh ``xnai worker curation`` on one private stack (``XNAI_BATCH=off``: the plan's prefork
processes; ``on``: one process, task threads and the encoder batcher). :data:`SUBMITTERS` closed-loop
submitters (submit, wait for the verified result, again) share the texts; then one submitter alone, for
the latency a lone caller sees. Reported: texts/s, latency percentiles and, batched, the tasks per encoder call.

Beside them, the ceiling on this machine: the same encoder in this process with nothing else running, one text
per call vs the batcher's calls (:data:`MAX_SIZE` texts, as it splits and orders them), with the threads the
worker's plan gives it. Batching saves what a call costs beyond its texts' compute; where the encoder's compute
per text dominates (a small CPU), no queueing design gets more than that ratio out of it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Any

from xnai_tasks.bench.harness import host_facts, model_stack_home, role_worker
from xnai_tasks.bench.model_benches import RESULT_TIMEOUT_S, sample_texts
from xnai_tasks.bench.options import BenchOptions, or_default
from xnai_tasks.client.sync import Client
from xnai_tasks.settings import Settings

#: Concurrent submitters of the throughput measurement.
SUBMITTERS = 64
#: Tasks of the one-submitter latency measurement.
ALONE_TASKS = 100
#: Texts the encoder-alone ceiling encodes each way.
CEILING_TEXTS = 320
#: The batcher's settings on the batched side.
MAX_SIZE = 32
MAX_WAIT_MS = 10


def run_batching(settings: Settings, args: BenchOptions) -> dict[str, Any]:
    """Both sides, one after the other, on one private stack; ``args.texts`` one-text tasks per side (1,280)."""
    from xnai_tasks.core.celery_app import create_app

    total = max(SUBMITTERS, or_default(args.texts, 1280))
    texts = sample_texts(total)
    sides: dict[str, dict[str, Any]] = {}
    # every task must reach the encoder: no response cache on either side
    with model_stack_home(settings) as bench, _clients(bench, SUBMITTERS) as clients:
        control = create_app(bench, main="xnai_bench_batching")
        try:
            for side, batch in (("unbatched", "off"), ("batched", "on")):
                env = {
                    "XNAI_BATCH": batch,
                    "XNAI_BATCH_MAX_SIZE": str(MAX_SIZE),
                    "XNAI_BATCH_MAX_WAIT_MS": str(MAX_WAIT_MS),
                }
                with role_worker(bench, control, "curation", env=env):
                    clients[0].submit("curation", "embed", texts=texts[:4]).get(timeout=RESULT_TIMEOUT_S)  # warm-up
                    sides[side] = _measure(clients, texts)
        finally:
            control.close()
        ceiling = encoder_alone(bench, texts[:CEILING_TEXTS])
    return {
        "benchmark": "batching",
        "submitters": SUBMITTERS,
        "texts": total,
        "batcher": {"max_size": MAX_SIZE, "max_wait_ms": MAX_WAIT_MS},
        "sides": sides,
        "encoder_alone": ceiling,
        "ratios": {
            "batched_vs_unbatched_texts_per_s": round(
                sides["batched"]["texts_per_s"] / sides["unbatched"]["texts_per_s"], 3
            ),
            "batched_vs_unbatched_p50_one_submitter": round(
                sides["batched"]["one_submitter_p50_ms"] / sides["unbatched"]["one_submitter_p50_ms"], 3
            ),
            "encoder_alone_batched_vs_single": round(ceiling["batched_texts_per_s"] / ceiling["single_texts_per_s"], 3),
        },
        "host": host_facts(),
    }


def encoder_alone(settings: Settings, texts: list[str]) -> dict[str, Any]:
    """Texts/s of the curation encoder in this process: one text per call, then the batcher's calls."""
    from xnai_tasks.batching.encoder_process import embed_batch
    from xnai_tasks.batching.runtime import BATCHED_ROLE
    from xnai_tasks.models import inference
    from xnai_tasks.models.loading import set_encoder_threads
    from xnai_tasks.models.registry import ModelRegistry
    from xnai_tasks.plan.host import plan_for
    from xnai_tasks.plan.planner import for_concurrency

    plan = for_concurrency(plan_for(settings).roles[BATCHED_ROLE], 1, settings.threads)
    holder = ModelRegistry.for_role(BATCHED_ROLE, settings, replace(plan, model_mode="lazy")).encoder
    set_encoder_threads(plan.threads_per_process)
    with holder.use() as encoder:
        embed_batch(encoder, texts[:MAX_SIZE])  # warm-up
        started = time.perf_counter()
        for text in texts:
            inference.embed(encoder, [text])
        single_s = time.perf_counter() - started
        started = time.perf_counter()
        for at in range(0, len(texts), MAX_SIZE):
            embed_batch(encoder, texts[at : at + MAX_SIZE])
        batched_s = time.perf_counter() - started
    return {
        "threads": plan.threads_per_process,
        "texts": len(texts),
        "single_texts_per_s": round(len(texts) / single_s, 1),
        "batched_texts_per_s": round(len(texts) / batched_s, 1),
    }


@contextmanager
def _clients(settings: Settings, count: int) -> Iterator[list[Client]]:
    """One client per submitter thread (a client's result consumer serves one thread)."""
    with ExitStack() as stack:
        made = []
        for _ in range(count):
            client = Client(settings)
            stack.callback(client.close)
            made.append(client)
        yield made


def _measure(clients: list[Client], texts: list[str]) -> dict[str, Any]:
    """Texts/s and latencies with every client submitting at once, then the latency of one client alone."""
    per = len(texts) // len(clients)
    started = time.perf_counter()
    results = _closed_loops(clients, [texts[i * per : (i + 1) * per] for i in range(len(clients))])
    elapsed = time.perf_counter() - started
    alone = _closed_loops(clients[:1], [texts[:ALONE_TASKS]])
    latencies = sorted(latency for latency, _ in results)
    calls = {(r["pid"], r["batch"]["call"]): r["batch"].get("encode_ms", 0.0) for _, r in results if r["batch"]["call"]}
    return {
        "texts_per_s": round(len(results) / elapsed, 1),
        "p50_ms": _ms(statistics.median(latencies)),
        "p95_ms": _ms(latencies[int(0.95 * (len(latencies) - 1))]),
        "one_submitter_p50_ms": _ms(statistics.median(latency for latency, _ in alone)),
        "encoder_calls": len(calls) if calls else len(results),
        "tasks_per_call": round(len(results) / len(calls), 1) if calls else 1.0,
        "encoder_s": round(sum(calls.values()) / 1000, 2) if calls else None,
        "seconds": round(elapsed, 2),
    }


def _closed_loops(clients: list[Client], shares: list[list[str]]) -> list[tuple[float, dict[str, Any]]]:
    """Each client, in its own thread, submits its texts one task at a time; (latency s, result) of every task."""
    done: list[tuple[float, dict[str, Any]]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def loop(client: Client, share: list[str]) -> None:
        try:
            for text in share:
                start = time.perf_counter()
                result = client.submit("curation", "embed", texts=[text]).get(timeout=RESULT_TIMEOUT_S)
                with lock:
                    done.append((time.perf_counter() - start, result))
        except BaseException as exc:  # reported after the join, not lost in a thread
            failures.append(exc)

    threads = [threading.Thread(target=loop, args=pair, daemon=True) for pair in zip(clients, shares, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return done


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
