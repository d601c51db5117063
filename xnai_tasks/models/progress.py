"""Progress of a long model step (hashing, assembling, loading): tqdm's bar on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    """A tqdm bar on ``stream`` when it is a terminal; otherwise a log line at start, each quarter and end."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, *, min_bytes: int = 0) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        #: Below ``min_bytes`` nothing is shown: small files are not worth a line.
        self.quiet = total is not None and total < min_bytes
        self._start = time.monotonic()
        self._quarter = 0
        self._bar: tqdm[Any] | None = None

    def __enter__(self) -> Progress:
        if self.quiet:
            return self
        if self.tty:
            shape = f"[{{bar:30}}] {{percentage:5.1f}}% of {_mb(self.total)}" if self.total else "..."
            self._bar = tqdm(
                total=self.total,
                file=self.stream,
                ascii="-#",
                bar_format=f"{self.label} {shape} {{elapsed_s:.1f}} s",
                mininterval=0.1,
            )
        else:
            log.info("%s: started (%s)", self.label, _mb(self.total))
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        quarter = int(min(1.0, self.done / self.total) * 4) if self.total else 0
        if 0 < quarter < 4 and quarter > self._quarter:
            self._quarter = quarter
            log.info("%s: %d%%", self.label, quarter * 25)

    def __exit__(self, *exc: object) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            seconds = time.monotonic() - self._start
            log.info("%s: %s in %.1f s", self.label, "failed" if exc[0] else "done", seconds)


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.0f} MB"
