"""The batching worker's encoder, run in a process of its own.

Why a process: a batching worker is one process whose consumer and task threads (gate, signing, result
stores) run Python all the time. torch gives up the GIL inside an operator but must take it back between
operators, dozens of times per forward pass, and waits behind those threads each time: measured on 2 cores,
the same batches ran at 142-145 texts/s alone and at about 95 texts/s inside the worker. Here the encoder's
process runs nothing else, and the worker's Python work and the encoder's compute overlap.

The two talk over the child's stdin and stdout in frames (a 4-byte length, then the bytes): a request is the
JSON list of texts; a reply is ``V`` with the count, the dimension and the vectors as float32 (the encoder's own
precision, so the vectors are the ones an in-process call returns), or ``T`` (the tokenizer refused a text: the
batcher then runs each request alone, so the bad text fails only its own task) or ``E`` (the encoder failed) with
one line saying why. No Python objects are serialized. The child leaves when its stdin closes (the worker
ended, however it ended).

The worker starts the child and waits until it has loaded the encoder: a model it cannot load stops the worker
in one line, as a preloaded model would. When the child dies, the worker logs one line and the next call starts
a new child. A call that finds it gone before its request was read (a broken pipe) runs on a new one; a call
during which it died (it may be what killed it) or that it did not answer within :data:`CALL_TIMEOUT_S` (it is
killed) fails with :class:`~xnai_tasks.errors.ModelError` and that line; the batcher then runs each request of
the batch alone, so a text that crashes the encoder fails only its own task. At most
:data:`MAX_STARTS_PER_MINUTE` children start in a minute; past that, calls are refused in one line until the
minute ends: nothing can loop on restarts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from xnai_tasks.errors import ModelError

if TYPE_CHECKING:
    from xnai_tasks.models.loading import Encoder

log = logging.getLogger(__name__)

#: Seconds a call may take before the child counts as hung and is killed (a large request is sent in parts of
#: :data:`PART_TEXTS`, each a call of its own).
CALL_TIMEOUT_S: Final = 120.0
#: Texts per call of a large request.
PART_TEXTS: Final = 256
#: The largest reply frame read (a part's vectors are a few MiB at most).
MAX_FRAME_BYTES: Final = 256 * 2**20
#: Seconds a new child may take to load the encoder.
START_TIMEOUT_S: Final = 120.0
#: Texts per forward pass within a batch (measured on 2 cores: sorted sub-batches of 16 beat one padded pass of 32).
SUB_BATCH: Final = 16
#: Children started within a minute before calls are refused: a child that dies on every call must not loop.
MAX_STARTS_PER_MINUTE: Final = 10

_READY: Final = b"R"
_VECTORS: Final = b"V"
_REFUSED: Final = b"T"
_ERROR: Final = b"E"
_LENGTH = struct.Struct(">I")
_SHAPE = struct.Struct(">II")


class EncoderProcess:
    """A child process holding the encoder at ``path``; :meth:`encode` sends it texts, one call at a time."""

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        max_length: int,
        label: str = "encoder",
        on_death: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.threads = max(1, threads)
        self.max_length = max_length
        self.label = label
        #: Told how each child ended ("signal SIGKILL"), after the log line (the worker records it for xnai status).
        self.on_death = on_death
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._starts: deque[float] = deque()

    @property
    def pid(self) -> int | None:
        """The running child's pid (None before the first start and after a death)."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def describe(self) -> dict[str, int | None]:
        """What the health task reports of it: the child's pid and how many started within the last minute."""
        now = time.monotonic()
        return {"pid": self.pid, "starts_last_minute": sum(1 for at in self._starts if now - at <= 60)}

    def start(self) -> None:
        """Start the child and wait until it has loaded the encoder; ModelError (one line) if it cannot."""
        with self._lock:
            try:
                self._ensure_started()
            except _Died as died:
                raise died.error from None

    def encode(self, texts: list[str]) -> list[list[float]]:
        """The vectors of ``texts``, in order. ValueError: the encoder refused them; ModelError: the child failed."""
        vectors: list[list[float]] = []
        for at in range(0, len(texts), PART_TEXTS):
            vectors.extend(self._encode_part(texts[at : at + PART_TEXTS]))
        return vectors

    def _encode_part(self, texts: list[str]) -> list[list[float]]:
        request = json.dumps(texts).encode()
        with self._lock:
            if self._child is not None and self._child.poll() is not None:
                self._died("it ended between two calls")  # logged; this call runs on a new one
            try:
                reply = self._call(request)
            except _Died as died:
                if not died.unread:
                    raise died.error from None
                try:  # it was gone before it read the request: the request cannot be what killed it
                    reply = self._call(request)
                except _Died as again:
                    raise again.error from None
        return _vectors(reply, len(texts))

    def _call(self, request: bytes) -> bytes:
        self._ensure_started()
        try:
            _write_frame(self._stdin(), request)
        except OSError as exc:  # nobody reads the pipe: the child was gone before this request
            raise _Died(self._died(f"{type(exc).__name__}: {exc}"), unread=True) from None
        return self._read(CALL_TIMEOUT_S)

    def close(self) -> None:
        """Stop the child (it also leaves by itself when the worker's end of its stdin closes)."""
        with self._lock:
            child, self._child = self._child, None
            if child is not None:
                _reap(child)

    def _ensure_started(self) -> None:
        if self._child is None:
            self._spawn()
        self._await_ready()

    def _spawn(self) -> None:
        now = time.monotonic()
        while self._starts and now - self._starts[0] > 60:
            self._starts.popleft()
        if len(self._starts) >= MAX_STARTS_PER_MINUTE:
            raise ModelError(
                f"the {self.label} process was started {len(self._starts)} times within a minute: not started "
                "again before that minute ends (the worker log says why each one ended)"
            )
        self._starts.append(now)
        self._ready = False
        self._child = subprocess.Popen(  # our own interpreter and module; stderr goes to the worker's log
            [sys.executable, "-m", __name__, str(self.path), str(self.threads), str(self.max_length)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        log.info("%s process started (pid %d)", self.label, self._child.pid)

    def _await_ready(self) -> None:
        if self._ready:
            return
        frame = self._read(START_TIMEOUT_S)
        if frame != _READY:
            why = _one_line(frame[1:]) if frame[:1] == _ERROR else "it did not say it was ready"
            raise _Died(self._died(f"it could not start: {why}"))
        self._ready = True

    def _stdin(self) -> IO[bytes]:
        assert self._child is not None and self._child.stdin is not None
        return self._child.stdin

    def _read(self, timeout_s: float) -> bytes:
        """The child's next frame, whole within ``timeout_s`` (read from the pipe itself: nothing is buffered here
        that ``select`` would not see)."""
        assert self._child is not None and self._child.stdout is not None
        fd = self._child.stdout.fileno()
        deadline = time.monotonic() + timeout_s

        def read(size: int) -> bytes:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError
            return os.read(fd, size)

        try:
            frame = _read_frame(read, MAX_FRAME_BYTES)
        except TimeoutError:
            self._child.kill()
            raise _Died(self._died(f"no answer within {timeout_s:g} s (killed)")) from None
        except ValueError as exc:  # a frame larger than any reply: not our child's output
            self._child.kill()
            raise _Died(self._died(f"{exc} (killed)")) from None
        if frame is None:
            raise _Died(self._died("its output ended"))
        return frame

    def _died(self, what: str) -> ModelError:
        """The child is gone (or made to go): one line for the log and the caller; the next call starts another."""
        child, self._child = self._child, None
        ended = _exit_text(_reap(child) if child is not None else None)
        line = f"the {self.label} process ended ({ended}): {what}; the next call starts a new one"
        log.warning(line, extra={"event": "encoder_process_died", "exit": ended})
        if self.on_death is not None:
            self.on_death(ended)
        return ModelError(line)


class _Died(Exception):
    """The child ended during a call; ``error`` is the caller's one line; ``unread``: before it read the request."""

    def __init__(self, error: ModelError, *, unread: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.unread = unread


def _reap(child: subprocess.Popen[bytes]) -> int:
    """Close our ends of the child's pipes (it leaves on its stdin's end) and wait for it, killing it after 5 s."""
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):  # a broken pipe's unwritten bytes: nobody will read them
                pipe.close()
    try:
        return child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def _vectors(reply: bytes, expected: int) -> list[list[float]]:
    """The vectors of a reply to ``expected`` texts; ValueError (refused texts) or ModelError (anything else)."""
    kind, body = reply[:1], reply[1:]
    if kind == _REFUSED:
        raise ValueError(_one_line(body))
    if kind == _ERROR:
        raise ModelError(f"the encoder failed: {_one_line(body)}")
    if kind != _VECTORS or len(body) < _SHAPE.size:
        raise ModelError("the encoder process sent a reply it should not: not vectors")
    count, dim = _SHAPE.unpack_from(body)
    if count != expected or (count and dim == 0) or len(body) != _SHAPE.size + 4 * count * dim:
        raise ModelError(f"the encoder process sent {count} vectors of {dim} for {expected} texts")
    flat = array("f")
    flat.frombytes(body[_SHAPE.size :])
    values = flat.tolist()
    return [values[i * dim : (i + 1) * dim] for i in range(count)]


def _one_line(raw: bytes) -> str:
    return " ".join(raw.decode(errors="replace").split())[:1000]


def _error_line(exc: BaseException) -> bytes:
    """An exception as the one line an error frame carries."""
    return _one_line(f"{type(exc).__name__}: {exc}".encode(errors="replace")).encode()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit unknown"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _write_frame(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()


def _read_frame(read: Callable[[int], bytes], limit: int | None = None) -> bytes | None:
    """A frame read with ``read(n)`` (up to n bytes, b"" at the end); None when the stream ends first.
    ValueError when it announces more than ``limit`` bytes."""
    head = _read_exactly(read, _LENGTH.size)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    if limit is not None and size > limit:
        raise ValueError(f"a frame of {size} bytes announced, at most {limit} expected")
    return _read_exactly(read, size)


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes | None:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def embed_batch(encoder: Encoder, texts: list[str]) -> list[list[float]]:
    """A batch's vectors, in order, the way the batcher computes them: shortest first, in sub-batches of
    :data:`SUB_BATCH` (a sub-batch pads its texts to its longest, not to the whole batch's)."""
    from xnai_tasks.models import inference as m

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = m.embed(encoder, [texts[i] for i in order], batch_size=SUB_BATCH)
    found: list[list[float]] = [[] for _ in texts]
    for position, index in enumerate(order):
        found[index] = vectors[position]
    return found


def serve(path: Path, threads: int, max_length: int) -> int:
    """The child: load the encoder, say ready, then answer frames until stdin closes."""
    from xnai_tasks.models.loading import load_encoder

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the worker's to handle; it closes our stdin
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to the log, never into a frame
    requests = os.fdopen(os.dup(0), "rb")
    try:
        encoder = load_encoder(path, threads, max_length=max_length)
    except Exception as exc:  # the worker says why in its one line
        _write_frame(replies, _ERROR + _error_line(exc))
        return 1
    _write_frame(replies, _READY)
    while (request := _read_frame(requests.read)) is not None:
        try:
            texts = json.loads(request)
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise TypeError("a request must be a list of texts")
            vectors = embed_batch(encoder, texts)
            dim = len(vectors[0]) if vectors else 0
            flat = array("f", [x for vector in vectors for x in vector])
            reply = _VECTORS + _SHAPE.pack(len(vectors), dim) + flat.tobytes()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # said in one line (a tokenizer's panic too); the child goes on
            kind = _REFUSED if isinstance(exc, (ValueError, TypeError)) else _ERROR
            reply = kind + _error_line(exc)
        _write_frame(replies, reply)
    return 0


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
