"""PNG plots of telemetry and load runs (matplotlib, Agg backend: no display needed).

Used by ``xnai report --plot DIR`` and ``xnai bench load --plot DIR``: a latency CDF per task kind,
throughput over time, and any sampled series (queue depth, memory, CPU) over time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Width of a throughput bin, seconds, when the run is short; longer runs get about 60 bins.
MIN_BIN_S = 1.0


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def latency_cdf(latencies: Mapping[str, Sequence[float]], path: Path, *, title: str = "latency CDF") -> Path:
    """One step curve per kind: the share of its requests done within x seconds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, values in latencies.items():
        ordered = sorted(values)
        if ordered:
            shares = [(i + 1) / len(ordered) for i in range(len(ordered))]
            ax.step(ordered, shares, where="post", label=f"{kind} (n={len(ordered)})")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("share of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if latencies:
        ax.legend(fontsize="small")
    return _save(fig, path)


def throughput(finished: Sequence[float], path: Path, *, title: str = "throughput") -> Path:
    """Completed requests per second over time, in bins, from their finishing times (Unix or run seconds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    if finished:
        start, end = min(finished), max(finished)
        width = max(MIN_BIN_S, (end - start) / 60)
        bins = int((end - start) // width) + 1
        counts = [0] * bins
        for ts in finished:
            counts[min(bins - 1, int((ts - start) // width))] += 1
        ax.bar([i * width for i in range(bins)], [n / width for n in counts], width=width, align="edge")
    ax.set_xlabel("seconds since the first")
    ax.set_ylabel("requests/s")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    return _save(fig, path)


def series(samples: Sequence[tuple[float, float]], path: Path, *, title: str, ylabel: str) -> Path:
    """A sampled value over time: (seconds since the start, value) pairs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    if samples:
        ax.plot([t for t, _ in samples], [v for _, v in samples])
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    return _save(fig, path)
