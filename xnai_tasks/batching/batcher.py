"""The batcher: requests from many task threads gathered into one encoder call, each answered on its own.

Each request (the texts of one task) waits in a queue; one thread takes the queue's head and, while the
batch has room, waits at most ``max_wait_s`` for more, but only while a task that announced itself
(:meth:`EncoderBatcher.expecting`) has not yet submitted: a lone request runs at once, so one caller pays
no wait. Requests never split; a request larger than ``max_size`` runs alone. Equal texts in a batch are
encoded once. If the call fails, each request is run alone, so a text the encoder cannot read fails only
its own task.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

Vector = list[float]
Encode = Callable[[list[str]], list[Vector]]


@dataclass(frozen=True)
class Batched:
    """A request's vectors, in order, and the encoder call that made them."""

    vectors: list[Vector]
    #: This process's number of the encoder call, and how many requests and distinct texts it carried.
    call: int
    requests: int
    texts: int
    #: Seconds the encoder call took.
    seconds: float = 0.0


@dataclass
class _Request:
    texts: list[str]
    answer: Future[Batched]


class EncoderBatcher:
    """Gathers :meth:`encode` calls from many threads into batched calls of ``encode`` on one thread."""

    def __init__(self, encode: Encode, *, max_size: int, max_wait_s: float) -> None:
        self._encode = encode
        self.max_size = max(1, max_size)
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: deque[_Request] = deque()
        self._changed = threading.Condition()
        self._coming = 0
        self._mine = threading.local()
        self._calls = itertools.count(1)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="xnai-encoder-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """This thread will submit soon (e.g. once its arguments are checked): a gathering batch waits for it."""
        with self._changed:
            self._coming += 1
        self._mine.coming = True
        try:
            yield
        finally:
            self._arrived()

    def encode(self, texts: Sequence[str]) -> Batched:
        """The vectors of ``texts``, from a batch shared with other threads; raises this request's own error."""
        request = _Request(list(texts), Future())
        with self._changed:
            if self._closed:
                raise RuntimeError("the encoder batcher is closed")
            self._queue.append(request)
            if getattr(self._mine, "coming", False):  # in the same step: a gathering batch never waits for it
                self._mine.coming = False
                self._coming -= 1
            self._changed.notify_all()
        return request.answer.result()

    def close(self) -> None:
        """Stop the batching thread once the queue is empty."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout=5)

    def _arrived(self) -> None:
        if getattr(self._mine, "coming", False):
            self._mine.coming = False
            with self._changed:
                self._coming -= 1
                self._changed.notify_all()

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._answer(batch)

    def _gather(self) -> list[_Request] | None:
        with self._changed:
            while not self._queue:
                if self._closed:
                    return None
                self._changed.wait()
            batch = [self._queue.popleft()]
            size = len(batch[0].texts)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_size:
                if self._queue and size + len(self._queue[0].texts) <= self.max_size:
                    size += len(self._queue[0].texts)
                    batch.append(self._queue.popleft())
                    continue
                left = deadline - time.monotonic()
                if self._queue or self._coming == 0 or left <= 0:
                    break
                self._changed.wait(left)
            return batch

    def _answer(self, batch: list[_Request]) -> None:
        distinct = list(dict.fromkeys(text for request in batch for text in request.texts))
        call = next(self._calls)
        started = time.perf_counter()
        try:
            found = dict(zip(distinct, self._encode(distinct), strict=True))
        except Exception as exc:  # one text may be at fault: each request alone finds whose
            if len(batch) == 1:
                batch[0].answer.set_exception(exc)
            else:
                for request in batch:
                    self._answer([request])
            return
        seconds = time.perf_counter() - started
        for request in batch:
            vectors = [found[text] for text in request.texts]
            request.answer.set_result(Batched(vectors, call, len(batch), len(distinct), seconds))
