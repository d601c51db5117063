"""Benchmarks (``xnai bench NAME``): each runs ours side by side with its baseline and reports ratios."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xnai_tasks.bench import model_benches
from xnai_tasks.bench.async_client import run_async_bench
from xnai_tasks.bench.batching import run_batching
from xnai_tasks.bench.load import run_load
from xnai_tasks.bench.options import BenchOptions
from xnai_tasks.bench.overload import run_overload
from xnai_tasks.bench.prompt_reuse import run_prompt_reuse
from xnai_tasks.bench.redis_restart import run_redis_restart
from xnai_tasks.bench.roundtrip import run_roundtrip
from xnai_tasks.bench.search import run_search
from xnai_tasks.settings import Settings

Benchmark = Callable[[Settings, BenchOptions], dict[str, Any]]

BENCHMARKS: dict[str, Benchmark] = {
    "roundtrip": run_roundtrip,
    "llm": model_benches.run_llm,
    "memory": model_benches.run_memory,
    "embed": model_benches.run_embed,
    "threads": model_benches.run_threads,
    "coldstart": model_benches.run_coldstart,
    "load": run_load,
    "overload": run_overload,
    "redis-restart": run_redis_restart,
    "search": run_search,
    "prompt-reuse": run_prompt_reuse,
    "batching": run_batching,
    "async": run_async_bench,
}
