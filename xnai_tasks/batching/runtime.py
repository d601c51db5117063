"""Where the batcher lives: one per curation worker process running Celery's thread pool.

Why threads: a prefork child runs one task at a time, so nothing could gather in it. With ``XNAI_BATCH=on``
the curation worker runs one process with Celery's ``threads`` pool (``2 x XNAI_BATCH_MAX_SIZE`` task
threads, :func:`task_threads`); each one-text ``embed``, ``search`` or ``classify`` task runs in its own
thread, as a normal Celery task, and hands only its texts to this process's :class:`EncoderBatcher`, whose
one thread sends the gathered batch to the encoder. Everything around the encoder call stays per task:
the consumer's gate verifies every message before it reaches the pool, the task's own thread returns its
own result, which the backend signs with the role's key, ``task_postrun`` finishes its own nonce, and its
message is acknowledged only after its own result is stored (``acks_late``): a killed worker leaves every
message it held unacked, and they are delivered again. The role's threads (the plan's CPU set) go to torch
in the encoder's own process (:mod:`.encoder_process`: away from this process's GIL); this process loads no
model unless something else in it asks (the semantic cache). The cost: Celery's thread
pool enforces no time limit on a task.

Not chosen: celery-batches' way (the task's strategy buffers requests in the consumer and flushes them to the
pool as one job of many requests, acknowledged together when it returns, each result stored by the task with
``backend.mark_as_done``). There a whole batch is one Celery task: ``task_prerun``/``task_postrun`` (our nonce
ledger, telemetry, metrics) fire once for all, the result of a request is stored outside its own task context
(so its nonce is not finished with it), one bad request must be handled by hand, and the prefetch must exceed
the batch size. Here every request stays a task of its own and only the encoder call is shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from xnai_tasks.batching.batcher import Batched, EncoderBatcher, Vector
from xnai_tasks.batching.encoder_process import EncoderProcess
from xnai_tasks.settings import Settings

#: The role whose encoder tasks are batched.
BATCHED_ROLE = "curation"


class _State:
    def __init__(self) -> None:
        self.batcher: EncoderBatcher | None = None
        #: The process running the role's encoder for this worker.
        self.encoder: EncoderProcess | None = None


_state = _State()


def batches(settings: Settings, role: str) -> bool:
    """Whether ``role``'s worker runs batched (the thread pool and a batcher)."""
    return settings.batch and role == BATCHED_ROLE


def task_threads(settings: Settings) -> int:
    """Task threads of a batched worker: enough to fill a batch while the previous one runs."""
    return max(8, 2 * settings.batch_max_size)


def is_thread_pool(worker: Any) -> bool:
    """Whether a Celery worker (``worker_init``'s sender) runs the thread pool."""
    pool = getattr(worker, "pool_cls", None)
    if isinstance(pool, str):
        return pool == "threads"
    return getattr(pool, "__module__", "") == "celery.concurrency.thread"


def start(settings: Settings, encoder: EncoderProcess) -> EncoderBatcher:
    """Make this process's batcher (the worker parent, which is the process running the tasks); its encoder
    calls go to ``encoder``, started here: ModelError (one line) when it cannot load the model."""
    encoder.start()
    _state.encoder = encoder
    _state.batcher = EncoderBatcher(
        encode_now, max_size=settings.batch_max_size, max_wait_s=settings.batch_max_wait_ms / 1000.0
    )
    return _state.batcher


def encoder_process() -> EncoderProcess | None:
    """This process's encoder process, if it batches."""
    return _state.encoder


def current() -> EncoderBatcher | None:
    """This process's batcher, if it batches."""
    return _state.batcher


@contextmanager
def expecting() -> Iterator[None]:
    """Announce that this task thread will submit texts soon (nothing when this process does not batch)."""
    batcher = _state.batcher
    if batcher is None:
        yield
        return
    with batcher.expecting():
        yield


def encode(texts: list[str]) -> Batched:
    """``texts`` through the batcher when they fit in a batch, else alone (the encoder runs one call at a time)."""
    batcher = _state.batcher
    if batcher is not None and len(texts) <= batcher.max_size:
        return batcher.encode(texts)
    return Batched(encode_now(texts), 0, 1, len(texts))


def encode_now(texts: list[str]) -> list[Vector]:
    """One call of the encoder process (one at a time: the batcher's, or a large request's of its own)."""
    if _state.encoder is None:
        raise RuntimeError("the batcher was not started")  # a programming error: start() runs at worker_init
    return _state.encoder.encode(texts)
