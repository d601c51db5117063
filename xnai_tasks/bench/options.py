"""What ``xnai bench NAME`` was asked for: the options every benchmark reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """Options of one benchmark run; ``None`` leaves the choice to the benchmark's own default."""

    tasks: int = 2000
    rounds: int = 3
    concurrency: int = 2
    tokens: int | None = None
    threads: int | None = None
    texts: int | None = None


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """``xnai bench load``'s own options: simulated agents, seconds of load, profiles, seed, plot folder, and
    whether to load the running stack."""

    users: int = 20
    duration: float = 60.0
    profile: str = "both"
    seed: int = 0
    plot_dir: str | None = None
    #: Load the stack the settings point at, already running (e.g. on several hosts), instead of a private one.
    running: bool = False


@dataclass(frozen=True, kw_only=True)
class OverloadOptions:
    """``xnai bench overload``'s own options: seconds of offered load, its multiple of capacity, the SLO, the task."""

    duration: float = 60.0
    factor: float = 3.0
    slo_s: float = 10.0
    delay_s: float = 0.2


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """``xnai bench search``'s own options: chunks in the bank, queries per round (each way), hits per query."""

    chunks: int = 10_000
    queries: int = 100
    k: int = 5


def or_default(value: int | None, default: int) -> int:
    """``value`` if given, else ``default``."""
    return default if value is None else value
