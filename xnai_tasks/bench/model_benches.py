"""Benchmarks of the model-backed roles, each side by side with its baseline in one run.

* ``llm``: tokens/s of ``grok.synthesize`` through the queue vs a direct llama-cpp-python call with the
  same threads in this process (``queue_vs_direct_tokens_per_s``).
* ``memory``: total PSS of a grok worker at concurrency 3 with preloaded models vs the same worker in
  lazy mode (3 children loading on their own) vs one process holding the models (solo pool).
* ``embed``: ``curation.embed`` of N texts in one task vs N one-text tasks (``batched_vs_single_task``).
* ``threads``: tokens/s and embeddings/s for each processes x threads split that fits the worker CPUs.
* ``coldstart``: seconds from starting ``xnai worker grok`` to its first token, preload vs lazy.

Every figure comes from real workers on a private XNAI_HOME and Redis (:mod:`harness`); LLM runs use
temperature 0 and a fixed seed, so both sides of a comparison generate the same tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery

from xnai_tasks.bench.harness import (
    host_facts,
    median,
    model_stack_home,
    pss_bytes,
    role_worker,
    solo_worker_argv,
    start_worker,
    stop_worker,
    wait_online,
)
from xnai_tasks.bench.options import BenchOptions, or_default
from xnai_tasks.client.sync import Client
from xnai_tasks.settings import Settings

RESULT_TIMEOUT_S = 600.0
PROMPT = "Write a long, detailed essay about the history of computing, from the abacus to the laptop."
MiB = 1024 * 1024

_WORDS = (
    ("quick", "quiet", "bright", "heavy", "small", "ancient", "modern", "curious"),
    ("worker", "river", "engine", "teacher", "server", "garden", "library", "market"),
    ("moves", "watches", "builds", "reads", "carries", "repairs", "describes", "follows"),
    ("bridge", "letter", "machine", "forest", "question", "signal", "recipe", "window"),
)


def sample_texts(n: int) -> list[str]:
    """``n`` different English sentences of varied length (deterministic)."""
    texts = []
    for i in range(n):
        a, b, c, d = (words[(i // 8**k) % 8] for k, words in enumerate(_WORDS))
        tail = " and then it rests for a while before starting again" * (i % 3)
        texts.append(f"Item {i}: the {a} {b} {c} the {d}{tail}.")
    return texts


@contextlib.contextmanager
def _session(settings: Settings) -> Iterator[tuple[Settings, Celery, Client]]:
    """A private home with Redis, keys and models; a control app and a client on it."""
    from xnai_tasks.core.celery_app import create_app

    with model_stack_home(settings) as bench:
        control = create_app(bench, main="xnai_bench")
        client = Client(bench)
        try:
            yield bench, control, client
        finally:
            client.close()
            control.close()


def _synthesize(client: Client, tokens: int, count: int = 1) -> tuple[list[dict[str, Any]], float]:
    """``count`` synthesize tasks at once; their results and the wall time until the last one."""
    start = time.perf_counter()
    handles = [
        client.submit("grok", "synthesize", prompt=PROMPT, max_tokens=tokens, temperature=0.0, seed=1)
        for _ in range(count)
    ]
    results = [h.get(timeout=RESULT_TIMEOUT_S) for h in handles]
    return results, time.perf_counter() - start


# ---------------------------------------------------------------- llm


def run_llm(settings: Settings, args: BenchOptions) -> dict[str, Any]:
    """Tokens/s through the queue (submit to result) vs a direct llama-cpp-python call, same threads."""
    from xnai_tasks.errors import ModelError
    from xnai_tasks.models.inference import generate
    from xnai_tasks.models.loading import load_llm
    from xnai_tasks.models.model_file import resolve_model
    from xnai_tasks.models.probe import llama_build, probe_llm
    from xnai_tasks.plan.host import plan_for

    tokens, threads, rounds = or_default(args.tokens, 128), or_default(args.threads, 2), or_default(args.rounds, 3)
    runs: dict[str, list[float]] = {"queue": [], "direct": []}
    counts: dict[str, int] = {}
    options: dict[str, Any] | None = None
    with _session(settings) as (bench, control, client):
        cpus = plan_for(bench).roles["grok"].cpus
        env = {"XNAI_THREADS": str(threads)}
        with role_worker(bench, control, "grok", concurrency=1, env=env):
            gguf = resolve_model("gguf", bench)
            before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, cpus)  # the direct side runs on the worker's CPUs too
            try:
                options = probe_llm(bench, gguf, threads).options  # what the worker serves with, remembered
                if options is None:
                    raise ModelError(f"the LLM cannot run on this host, nothing to measure: {gguf.name}")
                llm = load_llm(
                    gguf.path, int(gguf.params.get("n_ctx", 2048)), threads, params=gguf.params, options=options
                )
                _synthesize(client, 8)  # warm-up on both sides
                generate(llm, PROMPT, 8, 0.0, seed=1)
                for _ in range(rounds):
                    results, wall = _synthesize(client, tokens)
                    counts["queue"] = results[0]["completion_tokens"]
                    runs["queue"].append(counts["queue"] / wall)
                    start = time.perf_counter()
                    out = generate(llm, PROMPT, tokens, 0.0, seed=1)
                    counts["direct"] = out["completion_tokens"]
                    runs["direct"].append(counts["direct"] / (time.perf_counter() - start))
                del llm
            finally:
                os.sched_setaffinity(0, before)
    summary: dict[str, dict[str, Any]] = {
        name: {
            "tokens_per_s": round(median(values), 2),
            "completion_tokens": counts[name],
            "runs": [round(v, 2) for v in values],
        }
        for name, values in runs.items()
    }
    return {
        "benchmark": "llm",
        "max_tokens": tokens,
        "threads": threads,
        "cpus": cpus,
        "rounds": rounds,
        "llama_build": llama_build(),
        "load_options": options,
        "sides": summary,
        "ratios": {
            "queue_vs_direct_tokens_per_s": round(
                summary["queue"]["tokens_per_s"] / summary["direct"]["tokens_per_s"], 3
            )
        },
        "note": "queue = submit to result through Redis and a grok worker; direct = generate() in this process",
        "host": host_facts(),
    }


# ---------------------------------------------------------------- memory

ANALYZE_KWARGS: dict[str, Any] = {
    "question": "Which storage should a small offline app use?",
    "options": ["SQLite, an embedded database in one file", "PostgreSQL, a client-server database"],
    "seed": 1,
}


def _touch_every_child(client: Client, proc_pid: int, children: int, tokens: int) -> int:
    """Run grok.analyze (LLM + encoder) until each of the worker's ``children`` has answered; tasks run."""
    import psutil

    seen: set[int] = set()
    tasks = 0
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        pool = {p.pid for p in psutil.Process(proc_pid).children()}
        if pool and pool <= seen:
            return tasks
        handles = [client.submit("grok", "analyze", max_tokens=tokens, **ANALYZE_KWARGS) for _ in range(children)]
        seen.update(h.get(timeout=RESULT_TIMEOUT_S)["pid"] for h in handles)
        tasks += children
    raise TimeoutError("not every pool child answered")


def _measure_pss(pid: int) -> dict[str, Any]:
    figures = pss_bytes(pid)
    return {
        "processes": len(figures),
        "pss_mb": round(sum(figures.values()) / MiB, 1),
        "per_process_mb": [round(v / MiB, 1) for v in figures.values()],
    }


def run_memory(settings: Settings, args: BenchOptions) -> dict[str, Any]:
    """Total PSS: preloaded pool of 3 vs 3 children loading on their own vs one process."""
    tokens, children = or_default(args.tokens, 16), 3
    configs: dict[str, dict[str, Any]] = {}
    with _session(settings) as (bench, control, client):
        env = {"XNAI_THREADS": "1"}
        for name, mode in (("pool_preload", "preload"), ("independent", "lazy")):
            with role_worker(bench, control, "grok", concurrency=children, env=env | {"XNAI_MODEL_MODE": mode}) as proc:
                tasks = _touch_every_child(client, proc.pid, children, tokens)
                time.sleep(1.0)
                configs[name] = _measure_pss(proc.pid) | {"mode": mode, "tasks": tasks}
        argv = solo_worker_argv("grok")
        with role_worker(bench, control, "grok", env=env | {"XNAI_MODEL_MODE": "preload"}, argv=argv) as proc:
            client.submit("grok", "analyze", max_tokens=tokens, **ANALYZE_KWARGS).get(timeout=RESULT_TIMEOUT_S)
            time.sleep(1.0)
            configs["single"] = _measure_pss(proc.pid) | {"mode": "preload, solo pool", "tasks": 1}
    single = configs["single"]["pss_mb"]
    return {
        "benchmark": "memory",
        "children": children,
        "configs": configs,
        "ratios": {
            "pool_vs_single_pss": round(configs["pool_preload"]["pss_mb"] / single, 3),
            "independent_vs_single_pss": round(configs["independent"]["pss_mb"] / single, 3),
        },
        "note": "grok holds the LLM and the encoder; every process ran grok.analyze before PSS was read",
        "host": host_facts(),
    }


# ---------------------------------------------------------------- embed


def run_embed(settings: Settings, args: BenchOptions) -> dict[str, Any]:
    """``embed`` of N texts in one task vs N one-text tasks, rounds alternating; texts/s of each."""
    n, rounds = or_default(args.texts, 256), or_default(args.rounds, 3)
    texts = sample_texts(n)
    runs: dict[str, list[float]] = {"batched": [], "single_task": []}
    with _session(settings) as (bench, control, client), role_worker(bench, control, "curation"):
        client.submit("curation", "embed", texts=texts[:8]).get(timeout=RESULT_TIMEOUT_S)  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            result = client.submit("curation", "embed", texts=texts).get(timeout=RESULT_TIMEOUT_S)
            assert result["count"] == n
            runs["batched"].append(n / (time.perf_counter() - start))
            start = time.perf_counter()
            handles = [client.submit("curation", "embed", texts=[text]) for text in texts]
            for handle in handles:
                handle.get(timeout=RESULT_TIMEOUT_S)
            runs["single_task"].append(n / (time.perf_counter() - start))
    summary: dict[str, dict[str, Any]] = {
        name: {"texts_per_s": round(median(values), 1), "runs": [round(v, 1) for v in values]}
        for name, values in runs.items()
    }
    return {
        "benchmark": "embed",
        "texts": n,
        "rounds": rounds,
        "sides": summary,
        "ratios": {
            "batched_vs_single_task": round(
                summary["batched"]["texts_per_s"] / summary["single_task"]["texts_per_s"], 3
            )
        },
        "host": host_facts(),
    }


# ---------------------------------------------------------------- threads


def splits_for(n_cpus: int) -> list[tuple[int, int]]:
    """Every (processes, threads) with processes x threads <= ``n_cpus``."""
    return [(p, t) for p in range(1, n_cpus + 1) for t in range(1, n_cpus // p + 1)]


def _worker_cpus(settings: Settings) -> list[int]:
    from xnai_tasks.plan.host import plan_for

    plan = plan_for(settings)
    return sorted(set(plan.host.logical_cpus) - (set() if plan.shares_reserved else set(plan.reserved_cpus)))


def run_threads(settings: Settings, args: BenchOptions) -> dict[str, Any]:
    """LLM tokens/s and embeddings/s of each split of the worker CPUs into processes x threads."""
    tokens, n_texts = or_default(args.tokens, 64), or_default(args.texts, 128)
    texts = sample_texts(n_texts)
    rows: list[dict[str, Any]] = []
    with _session(settings) as (bench, control, client):
        cpus = _worker_cpus(bench)
        overrides = json.dumps({"grok": {"cpus": cpus}, "curation": {"cpus": cpus}})
        for processes, threads in splits_for(len(cpus)):
            env = {"XNAI_THREADS": str(threads), "XNAI_PLAN": overrides}
            procs = [start_worker(bench, role, concurrency=processes, env=env) for role in ("grok", "curation")]
            try:
                for proc, role in zip(procs, ("grok", "curation"), strict=True):
                    wait_online(proc, control, role)
                _synthesize(client, 4, processes)  # warm-up
                results, wall = _synthesize(client, tokens, 2 * processes)
                llm_tps = sum(r["completion_tokens"] for r in results) / wall
                warm = [client.submit("curation", "embed", texts=texts[:4]) for _ in range(processes)]
                for handle in warm:
                    handle.get(timeout=RESULT_TIMEOUT_S)
                start = time.perf_counter()
                handles = [client.submit("curation", "embed", texts=texts) for _ in range(2 * processes)]
                for handle in handles:
                    handle.get(timeout=RESULT_TIMEOUT_S)
                emb_s = 2 * processes * n_texts / (time.perf_counter() - start)
            finally:
                for proc in procs:
                    stop_worker(proc)
            rows.append(
                {
                    "processes": processes,
                    "threads": threads,
                    "llm_tokens_per_s": round(llm_tps, 1),
                    "embeddings_per_s": round(emb_s, 1),
                }
            )
    base = rows[0]
    best_llm = max(rows, key=lambda r: r["llm_tokens_per_s"])
    best_emb = max(rows, key=lambda r: r["embeddings_per_s"])
    ratios: dict[str, float] = {}
    for row in rows[1:]:
        split = f"{row['processes']}x{row['threads']}"
        ratios[f"llm_{split}_vs_1x1"] = round(row["llm_tokens_per_s"] / base["llm_tokens_per_s"], 3)
        ratios[f"embed_{split}_vs_1x1"] = round(row["embeddings_per_s"] / base["embeddings_per_s"], 3)
    return {
        "benchmark": "threads",
        "cpus": cpus,
        "max_tokens": tokens,
        "texts_per_task": n_texts,
        "splits": rows,
        "best": {
            "llm": f"{best_llm['processes']}x{best_llm['threads']}",
            "embed": f"{best_emb['processes']}x{best_emb['threads']}",
        },
        "ratios": ratios,
        "note": "each split: grok and curation workers with that concurrency and XNAI_THREADS on all worker CPUs; "
        "2 x processes tasks at once (LLM: max_tokens each; embed: texts_per_task each)",
        "host": host_facts(),
    }


# ---------------------------------------------------------------- coldstart


def run_coldstart(settings: Settings, args: BenchOptions) -> dict[str, Any]:
    """Seconds from starting ``xnai worker grok`` to its first generated token, preload vs lazy."""
    rounds = or_default(args.rounds, 3)
    runs: dict[str, list[float]] = {"preload": [], "lazy": []}
    with _session(settings) as (bench, _control, client):
        for _ in range(rounds):
            for mode in runs:
                start = time.perf_counter()
                proc = start_worker(bench, "grok", env={"XNAI_MODEL_MODE": mode})
                try:
                    result = client.submit("grok", "synthesize", prompt="Hello", max_tokens=1, seed=1).get(
                        timeout=RESULT_TIMEOUT_S
                    )
                    assert result["completion_tokens"] <= 1
                    runs[mode].append(time.perf_counter() - start)
                finally:
                    stop_worker(proc)
    summary: dict[str, dict[str, Any]] = {
        mode: {"seconds": round(median(values), 2), "runs": [round(v, 2) for v in values]}
        for mode, values in runs.items()
    }
    return {
        "benchmark": "coldstart",
        "rounds": rounds,
        "modes": summary,
        "ratios": {"lazy_vs_preload_first_token": round(summary["lazy"]["seconds"] / summary["preload"]["seconds"], 3)},
        "note": "from starting the worker process to the result of synthesize(max_tokens=1), submitted at start; "
        "preload loads the LLM and the encoder (torch) before the pool starts, lazy loads only what the task uses",
        "host": host_facts(),
    }
