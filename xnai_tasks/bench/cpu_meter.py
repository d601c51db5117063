"""CPU seconds used by named groups of processes over a stretch of a benchmark (user + system; a group is a
process and its living descendants: a process that ended within the stretch is not counted).

Why: on a machine whose cores the client, the workers and Redis all share, a benchmark's throughput follows the
CPU each task costs in all of them together; this says which process spends what a ratio measures.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import psutil


def cpu_seconds(pid: int, *, descendants: bool = True) -> float:
    """CPU seconds of a process (and of its living descendants) so far; 0 for a process that is gone."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)] if descendants else [root]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in family:
        try:
            times = proc.cpu_times()
        except psutil.Error:  # ended between the listing and the read
            continue
        total += times.user + times.system
    return total


class CpuMeter:
    """CPU seconds of each named process group during :meth:`measuring` blocks.

    ``families``: name -> a process whose descendants count too (a worker and its pool), None when it cannot be
    measured here (an external Redis: left out); ``alone``: name -> a process counted without its children (the
    benchmark's own, whose children are the workers).
    """

    def __init__(self, families: Mapping[str, int | None], alone: Mapping[str, int] | None = None) -> None:
        self._groups = {name: (pid, True) for name, pid in families.items() if pid is not None}
        self._groups |= {name: (pid, False) for name, pid in (alone or {}).items()}

    def snapshot(self) -> dict[str, float]:
        """Each group's CPU seconds so far."""
        return {name: cpu_seconds(pid, descendants=family) for name, (pid, family) in self._groups.items()}

    @contextmanager
    def measuring(self, into: dict[str, float]) -> Iterator[None]:
        """Fill ``into`` with each group's CPU seconds spent within the block."""
        before = self.snapshot()
        yield
        after = self.snapshot()
        into.update({name: max(0.0, after[name] - before[name]) for name in after})
