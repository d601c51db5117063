"""Benchmarks (``xnai bench NAME``): each runs ours side by side with its baseline and reports ratios."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xnai_tasks.bench import model_benches
from xnai_tasks.bench.load import run_load
from xnai_tasks.bench.options import BenchOptions
from xnai_tasks.bench.roundtrip import run_roundtrip
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
}
