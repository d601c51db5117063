"""The circuit breaker and the model pool on real processes over the real Redis (xnai_tasks/resilience).

One stack: the embedded Redis with its ACLs, a cline and a grok worker (lazy models, no LLM probe) that load the
test tasks, and the metrics endpoint. LLM failures are forced with a stand-in call through the real guard: the
``llm_call`` test task in a worker, or ``tests/guard_caller.py`` in a process of its own that connects as
the role's Redis user (another host, as far as Redis can tell).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.errors import RefusedError, TaskFailedError
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.resilience.breaker import Breaker, BreakerPolicy, BreakerState, read_state
from xnai_tasks.resilience.pool import ModelPool
from xnai_tasks.security import redis_urls
from xnai_tasks.settings import Settings

from support import TESTS_DIR, admin_connection, lazy_settings, metric_value, run_xnai, running_stack, wait_for_metric

LLM = "gemma-3-270m-q4_k_m"
FAILURES = 3
CONTEXT = (
    "SQLite stores a whole database in one file and needs no server. "
    "PostgreSQL runs as a server process that clients connect to over a socket. "
    "Bananas are yellow."
)
#: Breakers and pools of made-up models, so that a test can give its callers short periods of its own.
SHORT = {"breaker_open": 1, "breaker_open_max": 60}


@pytest.fixture(scope="module")
def settings() -> Settings:
    return lazy_settings(
        task_modules=("xnai_test_tasks",),
        breaker_failures=FAILURES,
        breaker_open=300,  # the workers' breakers stay open for the whole module
        breaker_open_max=600,
    )


@pytest.fixture(scope="module")
def running(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings, ("cline", "grok"), metrics=True) as stack:
        yield stack


@pytest.fixture(scope="module")
def client(running: Stack, settings: Settings) -> Iterator[Client]:
    import xnai_test_tasks  # noqa: F401  registers the llm_call tasks here too

    made = Client(settings)
    yield made
    made.close()


@pytest.fixture(scope="module")
def admin(running: Stack, settings: Settings) -> Iterator[redis.Redis]:
    with admin_connection(settings) as conn:
        yield conn


def caller(base: Settings, **job: Any) -> subprocess.Popen[str]:
    """``tests/guard_caller.py`` in a process of its own, with these settings (``settings=`` overrides some)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")} | base.to_env()
    return subprocess.Popen(
        [sys.executable, "-m", "guard_caller", json.dumps(job)],
        env=env | {"PYTHONPATH": TESTS_DIR},
        stdout=subprocess.PIPE,
        text=True,
    )


def outcome(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=120)
    return dict(json.loads(out.strip().splitlines()[-1]))


def first_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    return dict(json.loads(proc.stdout.readline()))


def wait_state(admin: redis.Redis, model: str, wanted: str) -> BreakerState:
    """Poll until the breaker reads ``wanted`` (or 60 s pass); the last reading."""
    deadline = time.monotonic() + 60
    while (state := read_state(admin, "cline", model)).state != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    return state


def open_breaker(settings: Settings, model: str, runs: Path, role: str = "cline") -> None:
    for _ in range(FAILURES):
        done = outcome(
            caller(settings, mode="call", role=role, model=model, fail=True, runs_file=str(runs), settings=SHORT)
        )
        assert "failed on purpose" in done["failed"]


def llm_of(health: dict[str, Any]) -> dict[str, Any]:
    return next(m for m in health["models"] if m["kind"] == "gguf")


def test_failures_in_one_worker_process_open_the_breaker_seen_by_every_process(
    client: Client, settings: Settings
) -> None:
    # Given the cline worker, whose stand-in LLM call fails
    # When it fails XNAI_BREAKER_FAILURES times
    for _ in range(FAILURES):
        with pytest.raises(TaskFailedError, match="failed on purpose"):
            client.submit("cline", "llm_call", fail=True).get(timeout=60)
    # Then another process (xnai status) sees the breaker open, with the reason
    done = run_xnai(["status", "--json"], settings)
    (breaker,) = [b for b in json.loads(done.stdout)["breakers"] if b["role"] == "cline"]
    assert breaker["state"] == "open" and breaker["model"] == LLM
    assert f"{FAILURES} failures within 60 s" in breaker["reason"] and "failed on purpose" in breaker["reason"]
    assert f"breaker cline {LLM}: OPEN" in run_xnai(["status"], settings).stdout
    # And so does the metrics endpoint: state 2 (open), one transition to open
    samples = wait_for_metric(settings, "xnai_breaker_state", 2, role="cline", model=LLM)
    assert metric_value(samples, "xnai_breaker_state", role="cline", model=LLM) == 2
    assert metric_value(samples, "xnai_breaker_transitions_total", role="cline", model=LLM, state="open") == 1


def test_while_open_cline_refuses_in_one_line_without_running_the_model(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    # Given cline's breaker is open (the test before)
    runs = tmp_path / "runs"
    # When cline is asked for code through the API and the CLI, and for a stand-in call
    with pytest.raises(RefusedError, match=f"circuit breaker open for cline on {LLM}"):
        client.submit("cline", "generate_code", spec="add two numbers").get(timeout=60)
    done = run_xnai(
        ["submit", "cline", "generate_code", "--kwargs", '{"spec": "add two numbers"}', "--wait", "--timeout", "60"],
        settings,
    )
    with pytest.raises(RefusedError, match="circuit breaker open"):
        client.submit("cline", "llm_call", fail=False, runs_file=str(runs)).get(timeout=60)
    # Then the CLI exits 3 with one line saying why, the call never ran and the LLM was never loaded
    assert done.returncode == 3, done.stderr
    assert "circuit breaker open for cline" in done.stderr and done.stderr.count("\n") == 1
    assert not runs.exists()
    health = client.submit("cline", "health").get(timeout=60)
    assert llm_of(health)["loaded"] is False and llm_of(health)["loads"] == 0


def test_a_new_process_does_not_reset_the_state(
    client: Client, settings: Settings, running: Stack, admin: redis.Redis
) -> None:
    # Given cline's open breaker as stored
    before = admin.hgetall(c.breaker_key("cline", LLM))
    # When a fresh process builds a guard and reads it, and cline's pool processes are killed and replaced
    seen = outcome(caller(settings, mode="read", role="cline", model=LLM))
    for child in psutil.Process(running.children["cline"].pid).children():
        if "worker" in " ".join(child.cmdline()):
            child.send_signal(signal.SIGKILL)
    # Then nothing was written, and the new pool processes still refuse
    assert seen["state"] == "open"
    with pytest.raises(RefusedError, match="circuit breaker open"):
        client.submit("cline", "generate_code", spec="add two numbers").get(timeout=120)
    assert admin.hgetall(c.breaker_key("cline", LLM)) == before


def test_while_open_grok_answers_degraded_with_the_reason(client: Client, settings: Settings, tmp_path: Path) -> None:
    # Given grok's breaker opened by failures in another process, as grok's Redis user
    for _ in range(FAILURES):
        done = outcome(caller(settings, mode="call", role="grok", model=LLM, fail=True, runs_file=str(tmp_path / "r")))
        assert "failed on purpose" in done["failed"]
    # When grok is asked to synthesize, with a context and without one
    answer = client.submit("grok", "synthesize", prompt="Which database needs no server?", context=CONTEXT).get(
        timeout=240
    )
    with pytest.raises(RefusedError, match="no context to extract from: circuit breaker open for grok"):
        client.submit("grok", "synthesize", prompt="Which database needs no server?").get(timeout=60)
    analysis = client.submit(
        "grok", "analyze", question="Which database needs no server?", options=["SQLite", "PostgreSQL"], context=CONTEXT
    ).get(timeout=120)
    # Then it answers from the context, marked degraded with the reason; without one it refuses, saying why
    assert answer["degraded"] is True and f"circuit breaker open for grok on {LLM}" in answer["degraded_reason"]
    assert "SQLite" in answer["text"]
    assert analysis["degraded"] is True and "circuit breaker open for grok" in analysis["degraded_reason"]
    assert analysis["models"]["llm"] is None and analysis["completion_tokens"] == 0


def test_while_open_cline_documents_from_its_notes_marked_degraded(client: Client) -> None:
    # Given cline's breaker is open
    # When cline is asked for documentation with notes
    answer = client.submit("cline", "generate_docs", topic="SQLite server", context=CONTEXT).get(timeout=60)
    # Then it answers from the notes, marked degraded with the reason
    assert answer["degraded"] is True and "circuit breaker open for cline" in answer["degraded_reason"]
    assert "SQLite stores a whole database" in answer["text"] and answer["completion_tokens"] == 0


def test_answers_slower_than_the_limit_count_as_timeouts_and_open_it(
    running: Stack, settings: Settings, admin: redis.Redis, tmp_path: Path
) -> None:
    # Given calls that answer, but only after XNAI_LLM_SLOW (1 s)
    job = {"mode": "call", "role": "cline", "model": "slow", "seconds": 1.5, "runs_file": str(tmp_path / "runs")}
    # When XNAI_BREAKER_FAILURES of them run at once
    results = [outcome(p) for p in [caller(settings, **job, settings=SHORT | {"llm_slow": 1}) for _ in range(FAILURES)]]
    # Then each caller got its answer, and the breaker opened, saying the calls were too slow
    assert all(r.get("ran") == "ok" for r in results), results
    state = read_state(admin, "cline", "slow")
    assert state.state == "open" and "(XNAI_LLM_SLOW=1)" in state.reason


def test_after_the_open_period_exactly_one_probe_runs_and_its_success_closes(
    running: Stack, settings: Settings, admin: redis.Redis, tmp_path: Path
) -> None:
    # Given an open breaker (a model of its own, open 1 s) whose open period is over
    model = "probe-closes"
    open_breaker(settings, model, tmp_path / "failures")
    assert wait_state(admin, model, "half_open").state == "half_open"
    # When 6 processes call at the same moment, each call taking 3 s
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    job = {"mode": "call", "role": "cline", "model": model, "seconds": 3, "runs_file": str(runs), "gate": str(gate)}
    procs = [caller(settings, **job, settings=SHORT) for _ in range(6)]
    assert all(first_line(p)["ready"] for p in procs)
    gate.touch()
    results = [outcome(p) for p in procs]
    # Then exactly one ran (the probe), every other was refused in one line, and the success closed the breaker
    assert [r.get("ran") for r in results].count("ok") == 1, results
    assert runs.read_text().count("ran") == 1
    refused = [r for r in results if "ran" not in r]
    assert all(r["refused"] == "BreakerOpenError" and "another call is the probe" in r["error"] for r in refused)
    assert all("\n" not in r["error"] for r in refused)
    after = read_state(admin, "cline", model)
    assert after.state == "closed" and after.transitions == {"open": 1, "half_open": 1, "closed": 1}


def test_a_failed_probe_reopens_for_a_longer_period(
    running: Stack, settings: Settings, admin: redis.Redis, tmp_path: Path
) -> None:
    # Given an open breaker whose open period is over
    model = "probe-fails"
    open_breaker(settings, model, tmp_path / "failures")
    first = read_state(admin, "cline", model)
    assert wait_state(admin, model, "half_open").state == "half_open"
    # When the probe fails
    probe = outcome(
        caller(
            settings, mode="call", role="cline", model=model, fail=True, runs_file=str(tmp_path / "r"), settings=SHORT
        )
    )
    # Then the breaker is open again, for longer, saying the probe failed
    again = read_state(admin, "cline", model)
    assert "failed on purpose" in probe["failed"]
    assert again.state == "open" and again.opens == 2 and again.period_s > first.period_s
    assert "the half-open probe failed" in again.reason


def test_the_pool_never_lets_more_than_the_cap_hold_a_lease(
    running: Stack, settings: Settings, admin: redis.Redis
) -> None:
    # Given a pool of 2 leases
    pool = {"model_pool": 2, "pool_lease": 2, "pool_wait": 60}
    count = "test:pool-cap"
    # When 5 processes each take a lease and hold it 1 s
    job = {"mode": "lease", "role": "cline", "model": "pool-cap", "seconds": 1, "wait": 60, "count_key": count}
    results = [outcome(p) for p in [caller(settings, **job, settings=pool) for _ in range(5)]]
    # Then every one got a lease in turn, and never more than 2 held one at once
    seen = [int(n) for n in admin.lrange(f"{count}:seen", 0, -1)]
    assert all(r.get("held") for r in results) and len(seen) == 5
    assert max(seen) <= 2


def test_a_killed_holders_lease_expires_and_others_proceed(
    running: Stack, settings: Settings, admin: redis.Redis
) -> None:
    # Given both leases of a pool of 2 held by processes that renew them
    pool = {"model_pool": 2, "pool_lease": 2, "pool_wait": 0}
    job = {"mode": "lease", "role": "cline", "model": "pool-kill", "seconds": None, "count_key": "test:pool-kill"}
    holders = [caller(settings, **job, settings=pool) for _ in range(2)]
    assert all(first_line(p)["held"] for p in holders)
    time.sleep(3)  # longer than a lease: only renewing keeps them
    refused = outcome(caller(settings, **job, settings=pool))
    # When both holders are killed with SIGKILL
    for proc in holders:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    waiting = outcome(caller(settings, **job | {"seconds": 0, "wait": 30}, settings=pool | {"pool_wait": 30}))
    # Then a third was refused in one line while they lived, and one after them got a lease once theirs expired
    assert refused["refused"] == "PoolBusyError" and "all 2 leases on pool-kill for cline" in refused["error"]
    assert waiting.get("held") is True, waiting


def test_a_role_reaches_only_its_own_breakers_and_pools(running: Stack, settings: Settings) -> None:
    # Given cline's Redis credential
    cline = broker.connect(redis_urls.connection_url(settings, "cline"))
    attempts = (
        lambda: cline.hset(c.breaker_key("grok", LLM), "state", "closed"),
        lambda: cline.delete(c.breaker_probe_key("grok", LLM)),
        lambda: cline.zadd(c.pool_key("grok", LLM, "host"), {"lease": 1}),
        lambda: Breaker(cline, "grok", LLM, BreakerPolicy()).admit(),
        lambda: ModelPool(cline, "grok", LLM, "host", cap=1, lease_s=1).try_acquire("lease"),
    )
    # When it touches grok's breaker and pool, by hand and through the scripts
    # Then Redis refuses each one
    try:
        for attempt in attempts:
            with pytest.raises(redis.ResponseError, match=r"(?i)noperm|permission"):
                attempt()
    finally:
        cline.close()
