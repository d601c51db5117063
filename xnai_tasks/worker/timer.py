"""A task's named phases, timed: what a role task reports with its result."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timer:
    """Named phases of a task, in seconds: ``with timer.phase("embed"): ...``; :meth:`as_dict` for the result."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        out = {f"{name}_s": round(value, 4) for name, value in self.phases.items()}
        out["total_s"] = round(time.perf_counter() - self._start, 4)
        return out
