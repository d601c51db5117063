"""The batching worker's encoder process: the real default encoder in a real child process.

Its vectors are the in-process ones; a text the tokenizer refuses fails alone; a child killed during or between
calls is said in one line and replaced, the call answered by the new one; a hung child is killed and its call
fails in one line; a child that keeps dying is not started again within the minute; a child whose worker died
leaves by itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from xnai_tasks.batching import encoder_process as ep
from xnai_tasks.batching.encoder_process import EncoderProcess, embed_batch
from xnai_tasks.errors import ModelError
from xnai_tasks.models.loading import Encoder, load_encoder
from xnai_tasks.models.model_file import ModelFile, resolve_model
from xnai_tasks.settings import Settings

TEXTS = ["the server restarts at noon", "a cat sleeps", "retry the upload three times", "64 GB of RAM"]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> ModelFile:
    return resolve_model("encoder", Settings(home=tmp_path_factory.mktemp("xnai-home")))


@pytest.fixture(scope="module")
def in_process(encoder_file: ModelFile) -> Encoder:
    return load_encoder(encoder_file.path, 1)


@pytest.fixture
def child(encoder_file: ModelFile) -> Iterator[EncoderProcess]:
    made = EncoderProcess(encoder_file.path, threads=1, max_length=256, label="test encoder")
    made.start()
    yield made
    made.close()


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    """Whether ``pid`` ended within the time (a zombie not yet reaped by its parent has ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _wait_reapable(made: EncoderProcess, timeout_s: float = 10.0) -> bool:
    """Whether ``made``'s child ended, as its parent sees it (a zombie can show before its parent may reap it)."""
    deadline = time.monotonic() + timeout_s
    while made.pid is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_its_vectors_are_the_in_process_ones(child: EncoderProcess, in_process: Encoder) -> None:
    # Given the same encoder in this process and in the child
    # When both embed the same batch
    remote = child.encode(TEXTS)
    local = embed_batch(in_process, TEXTS)
    # Then the vectors are equal, number for number (float32 both ways), in the order asked
    assert remote == local
    assert child.encode([]) == []


def test_a_text_the_tokenizer_refuses_fails_alone_and_the_child_goes_on(child: EncoderProcess) -> None:
    # Given a running child
    pid = child.pid
    # When it is sent a text the tokenizer cannot read (a lone surrogate: valid JSON, not UTF-8)
    with pytest.raises(ValueError) as raised:
        child.encode(["broken \ud800 text"])
    # Then the call fails with the encoder's reason in one line, and the same child answers the next request
    assert str(raised.value) and "\n" not in str(raised.value)
    assert len(child.encode(["still here"])) == 1
    assert child.pid == pid


def test_a_large_request_is_sent_in_parts_and_answered_in_order(
    child: EncoderProcess, in_process: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given parts of 4 texts
    monkeypatch.setattr(ep, "PART_TEXTS", 4)
    texts = [f"{text} ({i})" for i, text in enumerate(TEXTS * 3)]
    # When 12 texts are encoded
    # Then the vectors are those of one in-process call, in order
    assert child.encode(texts) == embed_batch(in_process, texts)


def test_a_child_killed_mid_call_fails_that_call_in_one_line_and_the_next_gets_a_new_one(
    child: EncoderProcess, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a running child, stopped so that the call below is in progress when it is killed
    first = child.pid
    assert first is not None and child.encode(["ready"])
    os.kill(first, signal.SIGSTOP)
    killer = subprocess.Popen([sys.executable, "-c", f"import os,time; time.sleep(1); os.kill({first}, 9)"])
    # When a call is made and the child dies during it (its request may be what killed it: not sent again)
    with caplog.at_level(logging.WARNING), pytest.raises(ModelError) as raised:
        child.encode(["lost"])
    killer.wait()
    # Then the call fails with one line naming the signal, logged as well
    line = str(raised.value)
    assert "\n" not in line and "signal SIGKILL" in line and "the next call starts a new one" in line
    assert [r.getMessage() for r in caplog.records if "SIGKILL" in r.getMessage()] == [line]
    # And the next call runs on a new child
    assert len(child.encode(["again"])) == 1
    assert child.pid not in (None, first)


def test_a_child_that_died_between_calls_is_said_and_replaced(
    child: EncoderProcess, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a child killed while idle
    first = child.pid
    assert first is not None and child.encode(["ready"])
    os.kill(first, signal.SIGKILL)
    assert _wait_reapable(child)
    # When the next call comes
    with caplog.at_level(logging.WARNING):
        vectors = child.encode(["after the kill"])
    # Then it is answered by a new child, and the death was logged in one line
    assert len(vectors) == 1 and child.pid not in (None, first)
    assert any("signal SIGKILL" in r.getMessage() and "between two calls" in r.getMessage() for r in caplog.records)


def test_a_hung_child_is_killed_after_the_call_timeout(child: EncoderProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a child that stops answering (stopped) and a short call timeout
    first = child.pid
    assert first is not None and child.encode(["ready"])
    monkeypatch.setattr(ep, "CALL_TIMEOUT_S", 1.0)
    os.kill(first, signal.SIGSTOP)
    # When a call is made
    with pytest.raises(ModelError, match=r"no answer within 1 s \(killed\)"):
        child.encode(["never answered"])
    # Then the hung child is gone, reaped, not left behind
    assert child.pid is None and not psutil.pid_exists(first)


def test_a_child_that_keeps_dying_is_not_started_again_within_the_minute(
    encoder_file: ModelFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given at most 2 starts a minute
    monkeypatch.setattr(ep, "MAX_STARTS_PER_MINUTE", 2)
    made = EncoderProcess(encoder_file.path, threads=1, max_length=256)
    try:
        made.start()
        for allowed in (True, False):
            # When its child is killed and a call comes
            pid = made.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert _wait_reapable(made)
            if allowed:  # Then the second start of the minute answers it
                assert len(made.encode(["x"])) == 1
                continue
            # And the third is refused in one line, with no child started for it
            with pytest.raises(ModelError, match="started 2 times within a minute: not started again") as raised:
                made.encode(["x"])
            assert "\n" not in str(raised.value) and made.pid is None
    finally:
        made.close()


def test_a_child_leaves_when_its_worker_dies(encoder_file: ModelFile, tmp_path: Path) -> None:
    # Given a process (standing in for the worker) that started an encoder process and waits
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from xnai_tasks.batching.encoder_process import EncoderProcess\n"
        f"made = EncoderProcess(Path({str(encoder_file.path)!r}), threads=1, max_length=256)\n"
        "made.start()\n"
        "made.encode(['ready'])\n"
        "print(made.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())
        assert not _wait_gone(pid, timeout_s=0.2)
        # When the owner is killed (no cleanup of its own runs)
        owner.kill()
        owner.wait()
        # Then its encoder process leaves by itself (its stdin closed)
        assert _wait_gone(pid)
    finally:
        owner.kill()


def test_a_model_the_child_cannot_load_stops_the_start_in_one_line(tmp_path: Path) -> None:
    # Given a folder that holds no model
    made = EncoderProcess(tmp_path, threads=1, max_length=256, label="test encoder")
    # When the encoder process is started
    with pytest.raises(ModelError) as raised:
        made.start()
    # Then the start fails with one line saying why the child could not load it, and no child is left
    line = str(raised.value)
    assert "\n" not in line and "it could not start: ModelError: transformers cannot load" in line
    assert made.pid is None
    made.close()


def test_a_reply_that_is_not_the_vectors_asked_for_is_refused() -> None:
    # Given replies that do not match a request of 2 texts
    good = ep._VECTORS + ep._SHAPE.pack(2, 3) + array("f", [0.5] * 6).tobytes()
    assert ep._vectors(good, 2) == [[0.5] * 3, [0.5] * 3]
    bad = {
        "another count": ep._VECTORS + ep._SHAPE.pack(3, 2) + array("f", [0.5] * 6).tobytes(),
        "no dimension": ep._VECTORS + ep._SHAPE.pack(2, 0),
        "cut short": good[:-4],
        "too long": good + b"\0\0\0\0",
        "unknown kind": b"X" + good[1:],
    }
    # When each is read, Then it is refused as a model error, never turned into vectors
    for name, reply in bad.items():
        with pytest.raises(ModelError, match="the encoder process sent"):
            ep._vectors(reply, 2)
            pytest.fail(f"{name}: read as vectors")
    # And an error from the encoder is one line
    with pytest.raises(ModelError, match="the encoder failed: RuntimeError: out of memory"):
        ep._vectors(ep._ERROR + b"RuntimeError: out of\nmemory", 2)


def test_a_reply_cut_off_mid_frame_times_out_and_its_child_is_killed(tmp_path: Path) -> None:
    # Given a child (standing in for the encoder) that writes half a frame, then nothing more
    made = EncoderProcess(tmp_path, threads=1, max_length=256, label="test encoder")
    made._child = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; sys.stdout.buffer.write(b'\\0\\0\\0\\x10half'); "
         "sys.stdout.flush(); time.sleep(60)"],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )  # fmt: skip
    made._ready = True
    pid = made._child.pid
    # When its reply is read with a 1 s limit
    started = time.monotonic()
    with pytest.raises(ep._Died) as raised:
        made._read(1.0)
    # Then the read gives up within the limit (not blocked on the missing bytes), and the child is killed
    assert time.monotonic() - started < 5
    assert "no answer within 1 s (killed)" in str(raised.value.error) and "signal SIGKILL" in str(raised.value.error)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
