"""``xnai report``: throughput, latency and errors per task kind, computed offline from the telemetry files.

Percentiles are **nearest-rank**: the p-th percentile of n sorted values is the value of rank
``ceil(p / 100 * n)`` (1-based; rank 1 for p = 0), always one of the measured values, never interpolated.
No value: ``None``.

A record's latency is sent to finished as the worker saw it (queue wait + run time); requests/s is the
completed (successful) tasks over the window from the first message sent to the last task finished.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xnai_tasks.errors import UsageError
from xnai_tasks.observability.telemetry import Record, read_records

#: The whole set's key in a report's ``kinds``.
OVERALL = "overall"

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h`` or ``7d`` as seconds; UsageError otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise UsageError(f"--since {text!r} is not a duration (e.g. 90s, 15m, 2h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0-100) of ``values``; None when there are none."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not within 0-100")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(frozen=True)
class KindStats:
    """What ``xnai report`` says of one task kind (or of all)."""

    count: int
    completed: int
    errors: int
    refusals: int
    retries: int
    window_s: float
    requests_per_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    queue_wait_p50_s: float | None
    queue_wait_p99_s: float | None
    tokens: int

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def stats_of(records: Sequence[Record]) -> KindStats:
    """The figures of a set of records (see the module's docstring for each definition)."""
    outcomes = [r.outcome for r in records]
    completed = outcomes.count("success")
    window = (max(r.ts for r in records) - min(r.sent for r in records)) if records else 0.0
    latencies = [r.latency_s for r in records if r.outcome == "success"]
    waits = [r.queue_wait_s for r in records if r.queue_wait_s is not None]
    return KindStats(
        count=len(records),
        completed=completed,
        errors=outcomes.count("error"),
        refusals=outcomes.count("refused"),
        retries=outcomes.count("retry"),
        window_s=round(window, 3),
        requests_per_s=round(completed / window, 4) if window > 0 else 0.0,
        latency_p50_s=_round(percentile(latencies, 50)),
        latency_p95_s=_round(percentile(latencies, 95)),
        latency_p99_s=_round(percentile(latencies, 99)),
        queue_wait_p50_s=_round(percentile(waits, 50)),
        queue_wait_p99_s=_round(percentile(waits, 99)),
        tokens=sum(r.tokens or 0 for r in records),
    )


def by_kind(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records per task name, plus every one under :data:`OVERALL`."""
    kinds: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        kinds[record.task].append(record)
        kinds[OVERALL].append(record)
    return dict(sorted(kinds.items(), key=lambda item: (item[0] == OVERALL, item[0])))


def build_report(directory: Path, *, since_s: float | None = None, now: float | None = None) -> dict[str, Any]:
    """The report over ``directory``'s telemetry, restricted to the last ``since_s`` seconds when given."""
    now = time.time() if now is None else now
    since = None if since_s is None else now - since_s
    records = list(read_records(directory, since=since))
    return {
        "source": str(directory),
        "since_s": since_s,
        "records": len(records),
        "percentiles": "nearest-rank",
        "kinds": {kind: stats_of(group).to_json() for kind, group in by_kind(records).items()},
    }


_COLUMNS = (
    ("count", "count"),
    ("req/s", "requests_per_s"),
    ("p50 s", "latency_p50_s"),
    ("p95 s", "latency_p95_s"),
    ("p99 s", "latency_p99_s"),
    ("wait p50", "queue_wait_p50_s"),
    ("wait p99", "queue_wait_p99_s"),
    ("errors", "errors"),
    ("refused", "refusals"),
)


def format_report(report: dict[str, Any]) -> str:
    """The report as a table, one row per task kind, ``overall`` last."""
    kinds: dict[str, dict[str, Any]] = report["kinds"]
    if not kinds:
        return f"no telemetry in {report['source']}" + (
            f" in the last {report['since_s']:.0f} s" if report["since_s"] else ""
        )
    width = max(len(kind) for kind in kinds)
    lines = [f"{'task':<{width}}  " + "  ".join(f"{title:>9}" for title, _ in _COLUMNS)]
    for kind, stats in kinds.items():
        cells = [
            "-" if stats[key] is None else f"{stats[key]:.3g}" if isinstance(stats[key], float) else str(stats[key])
            for _, key in _COLUMNS
        ]
        lines.append(f"{kind:<{width}}  " + "  ".join(f"{cell:>9}" for cell in cells))
    lines.append(f"({report['records']} tasks; latency: sent to finished; percentiles: nearest-rank)")
    return "\n".join(lines)


def plot_report(directory: Path, out_dir: Path, *, since_s: float | None = None) -> list[Path]:
    """``latency_cdf.png`` (successful tasks, per kind) and ``throughput.png`` in ``out_dir``; their paths."""
    from xnai_tasks.observability import plots

    since = None if since_s is None else time.time() - since_s
    records = list(read_records(directory, since=since))
    kinds = {kind: [r.latency_s for r in group if r.outcome == "success"] for kind, group in by_kind(records).items()}
    kinds.pop(OVERALL, None)
    return [
        plots.latency_cdf(kinds, out_dir / "latency_cdf.png", title="latency CDF per task (sent to finished)"),
        plots.throughput([r.ts for r in records if r.outcome == "success"], out_dir / "throughput.png"),
    ]
