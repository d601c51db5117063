"""Benchmarks (``xnai bench NAME``): each runs ours side by side with its baseline and reports ratios."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from xnai_tasks.bench.roundtrip import run_roundtrip
from xnai_tasks.settings import Settings

Benchmark = Callable[[Settings, argparse.Namespace], dict[str, Any]]

BENCHMARKS: dict[str, Benchmark] = {
    "roundtrip": run_roundtrip,
}
