"""The regression gate (``make bench``): quick runs of every benchmark, each ratio compared with the baseline.

A ratio is ours against a baseline measured side by side in the same run, so it is much steadier than a
raw rate; still, run the gate on an otherwise idle machine. A ratio more than :data:`TOLERANCE` worse than
the committed one (``baseline.json`` beside this module) fails, with a table of what moved. Which way is
worse is part of each baseline entry: ``higher`` is better for speed ratios, ``lower`` for memory and time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from xnai_tasks.bench.options import BenchOptions, LoadOptions, OverloadOptions
from xnai_tasks.settings import Settings

#: The committed baseline ratios.
BASELINE_PATH = Path(__file__).resolve().parent / "baseline.json"
#: How much worse than its baseline a ratio may be before the gate fails.
TOLERANCE = 0.15
#: Quick settings per benchmark: enough work for a stable ratio, a minute or two each on 2 cores.
QUICK: dict[str, dict[str, int]] = {
    "roundtrip": {"tasks": 400, "rounds": 2},
    "llm": {"tokens": 32, "rounds": 2},
    "memory": {"tokens": 8},
    "embed": {"texts": 64, "rounds": 2},
    "threads": {"tokens": 16, "texts": 32},
    "coldstart": {"rounds": 1},
    "search": {"rounds": 1},
    "prompt-reuse": {"rounds": 2, "tokens": 4},
    "batching": {"texts": 640},
}
#: The load bench's quick run: a few agents for a short while, both profiles.
QUICK_LOAD = LoadOptions(users=4, duration=20.0)
#: The overload bench's quick run: 3x capacity for a short while (its ratios: goodput vs capacity, share in SLO).
QUICK_OVERLOAD = OverloadOptions(duration=20.0)
#: Benchmarks that report seconds of a recovery, no ratio against a baseline: the gate does not run them.
NOT_GATED = ("redis-restart",)
#: Ratios where a smaller value is the better one (memory, seconds); every other ratio: bigger is better.
LOWER_IS_BETTER = ("pss", "first_token", "ttft", "p99", "p50", "latency", "seconds")

Better = Literal["higher", "lower"]


@dataclass(frozen=True, kw_only=True)
class Moved:
    """One ratio compared with its baseline."""

    name: str
    baseline: float
    measured: float | None
    better: Better

    @property
    def change(self) -> float | None:
        """How much better (positive) or worse (negative) than the baseline, as a fraction of it."""
        if self.measured is None or not self.baseline:
            return None
        gain = (self.measured - self.baseline) / abs(self.baseline)
        return gain if self.better == "higher" else -gain

    @property
    def failed(self) -> bool:
        """Worse than the baseline by more than the tolerance, or not measured at all."""
        change = self.change
        return change is None or change < -TOLERANCE


def better_direction(name: str) -> Better:
    """Which way a ratio named ``name`` improves."""
    return "lower" if any(word in name for word in LOWER_IS_BETTER) else "higher"


def quick_options(name: str) -> BenchOptions:
    """The quick settings of benchmark ``name`` (those its options know)."""
    known = {f.name for f in fields(BenchOptions)}
    return BenchOptions(**{k: v for k, v in QUICK.get(name, {}).items() if k in known})


def measure(
    settings: Settings, benchmarks: Mapping[str, Callable[[Settings, BenchOptions], dict[str, Any]]]
) -> dict[str, float]:
    """Run every benchmark quickly; its ratios, named ``BENCH.RATIO``."""
    ratios: dict[str, float] = {}
    for name, run in benchmarks.items():
        if name in NOT_GATED:
            continue
        if name == "load":
            from xnai_tasks.bench.load import run_load

            report = run_load(settings, BenchOptions(), QUICK_LOAD)
        elif name == "overload":
            from xnai_tasks.bench.overload import run_overload

            report = run_overload(settings, BenchOptions(), QUICK_OVERLOAD)
        else:
            report = run(settings, quick_options(name))
        for ratio, value in report.get("ratios", {}).items():
            if isinstance(value, int | float):
                ratios[f"{name}.{ratio}"] = float(value)
    return ratios


def compare(baseline: Mapping[str, Mapping[str, Any]], measured: Mapping[str, float]) -> list[Moved]:
    """Every baseline ratio against what was measured (a ratio no longer measured counts as failed)."""
    return [
        Moved(name=name, baseline=float(entry["value"]), measured=measured.get(name), better=entry["better"])
        for name, entry in sorted(baseline.items())
    ]


def as_baseline(measured: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Measured ratios as baseline entries."""
    return {name: {"value": value, "better": better_direction(name)} for name, value in sorted(measured.items())}


def read_baseline(path: Path = BASELINE_PATH) -> dict[str, dict[str, Any]]:
    """The committed baseline."""
    data: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))["ratios"]
    return data


def format_table(rows: list[Moved]) -> str:
    """What moved, one line per ratio, worst first."""
    lines = [f"{'ratio':48} {'baseline':>9} {'measured':>9} {'change':>8}  better"]
    for row in sorted(rows, key=lambda r: (r.change is not None, r.change or 0.0)):
        measured = "-" if row.measured is None else f"{row.measured:.3f}"
        change = "missing" if row.change is None else f"{row.change * 100:+.1f}%"
        flag = "  FAIL" if row.failed else ""
        lines.append(f"{row.name:48} {row.baseline:>9.3f} {measured:>9} {change:>8}  {row.better}{flag}")
    return "\n".join(lines)
