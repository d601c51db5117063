"""``xnai up`` supervises the embedded Redis: killed with SIGKILL while tasks run, it is started again and no task
is lost, none runs twice but those that were running, and a client waiting meanwhile gets its result.

Real processes throughout: ``xnai up --roles copilot,curation`` (Redis, its guard, the copilot worker with beat, a
curation worker of two pool processes loading the tests' own tasks, Flower, the metrics endpoint), the Python
client in this process, and ``xnai submit --wait`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from xnai_tasks.bench.redis_restart import UpProcess
from xnai_tasks.client.sync import Client
from xnai_tasks.core import broker
from xnai_tasks.core import constants as c
from xnai_tasks.observability.telemetry import read_records
from xnai_tasks.ops.memory_guard import MemoryGuard
from xnai_tasks.security import acl, redis_urls
from xnai_tasks.security.keyring import shared_keyring
from xnai_tasks.settings import Settings

from support import free_port, run_xnai, short_home, wait_flower_success

pytestmark = pytest.mark.slow

TESTS_DIR = str(Path(__file__).resolve().parent)
ENV = {"PYTHONPATH": TESTS_DIR}  # the worker and the CLI import tests/xnai_test_tasks.py
PROCESSES = 2
TASKS = 60
#: Seconds within which every result must have arrived after the kill: a bound against a hang, not a timing.
BOUND_S = 180.0


@pytest.fixture(scope="module")
def settings() -> Iterator[Settings]:
    made = Settings(
        home=short_home(),
        model_mode="lazy",
        llm_safe="off",
        task_modules=("xnai_test_tasks",),
        flower_port=free_port(),
        metrics_port=free_port(),
        plan_overrides=json.dumps({"curation": {"processes": PROCESSES}}),
        copilot_every_s=5,  # beat sends check_services every 5 s: seen again soon after the restart
    )
    yield made
    shutil.rmtree(made.home, ignore_errors=True)


@pytest.fixture(scope="module")
def up(settings: Settings) -> Iterator[UpProcess]:
    with UpProcess(settings, ["--roles", "copilot,curation"], env=ENV) as running:
        running.wait_for("xnai up: ready", 180)
        yield running


@pytest.fixture(scope="module")
def admin(up: UpProcess, settings: Settings) -> Iterator[redis.Redis]:
    conn = broker.connect(redis_urls.connection_url(settings, acl.ADMIN))
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def client(up: UpProcess, settings: Settings) -> Iterator[Client]:
    import xnai_test_tasks  # noqa: F401  registers curation.nap here too

    made = Client(settings)
    yield made
    made.close()


def runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def settled(check: Callable[[], bool], within_s: float = 10.0) -> bool:
    """``check()`` once it holds, or at the end of ``within_s``: a result is stored just before its message is acked."""
    deadline = time.monotonic() + within_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)
    return check()


def beat_ran_since(settings: Settings, since: float) -> bool:
    """Whether the copilot finished a ``check_services`` (sent by beat) at or after ``since``."""
    return any(
        r.role == "copilot" and r.task.endswith("check_services")
        for r in read_records(settings.telemetry_dir, since=since)
    )


def wait_running(path: Path, up: UpProcess) -> None:
    while not runs(path):
        assert up.proc.poll() is None, up.said()[-10:]


def waiting_cli(settings: Settings, runs_file: Path) -> subprocess.Popen[str]:
    """``xnai submit --wait`` of a nap long enough to be running when Redis dies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")} | settings.to_env() | ENV
    kwargs = json.dumps({"seconds": 6.0, "runs_file": str(runs_file)})
    return subprocess.Popen(  # our own interpreter and module
        [
            sys.executable,
            "-m",
            "xnai_tasks",
            "submit",
            "curation",
            "nap",
            "--kwargs",
            kwargs,
            "--wait",
            "--timeout",
            "150",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_redis_killed_under_load_is_restarted_and_every_task_answers(
    up: UpProcess, client: Client, admin: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    # Given grok locked out by the memory guard (a restart reloads the ACL file, which has every user on)
    guard = MemoryGuard(admin, shared_keyring(settings.home), max_message_age=settings.max_message_age, say=print)
    guard.lock("grok", held_bytes=1, maxmemory=1)
    # And a client in a subprocess waiting on a task that is running
    cli_runs = tmp_path / "cli"
    cli = waiting_cli(settings, cli_runs)
    wait_running(cli_runs, up)
    # And TASKS tasks in flight in this process, every tenth a slow one, a quarter of them answered
    files = [tmp_path / f"runs-{i}" for i in range(TASKS)]
    handles = [
        client.submit("curation", "nap", seconds=1.5 if i % 10 == 0 else 0.05, runs_file=str(files[i]))
        for i in range(TASKS)
    ]
    for handle in handles[: TASKS // 4]:
        handle.get(timeout=BOUND_S)
    # When redis-server is killed with SIGKILL
    os.kill(up.redis_pid(), signal.SIGKILL)
    # Then every task answers, with a result signed by the curation worker (TaskHandle.get checks it)
    answers = [handle.get(timeout=BOUND_S) for handle in handles]
    assert [answer["runs"] for answer in answers] == [runs(path) for path in files]
    # And only the tasks that were running when Redis died ran twice (terminated, then given back), none more
    twice = [i for i, path in enumerate(files) if runs(path) == 2]
    assert len(twice) + (runs(cli_runs) - 1) <= PROCESSES and all(runs(path) <= 2 for path in files), twice
    # And the client that waited across the outage got its result and exited 0, with nothing on stderr
    out, err = cli.communicate(timeout=BOUND_S)
    assert cli.returncode == 0, err
    assert err == "" and json.loads(out)["runs"] == runs(cli_runs)
    # And this client still sends and waits as before the outage
    assert client.submit("curation", "nap", seconds=0.0).get(timeout=BOUND_S)["runs"] == 0
    # And `xnai up` said so: Redis exited, and was restarted once
    said = up.said()
    assert [line for line in said if line.startswith("xnai up: redis")] == [
        "xnai up: redis exited (killed by SIGKILL); restarting now",
        next(line for line in said if line.startswith("xnai up: redis restarted (pid ")),
    ]
    # And no message was refused (none given back was taken for a replay of itself), none is left unacked
    assert admin.hgetall(c.refused_counter_key("curation")) == {}
    assert settled(lambda: admin.hlen(c.unacked_key("curation")) == 0)
    # And the guard locked grok out again
    assert settled(lambda: "off" in admin.acl_getuser("grok")["flags"])
    # And `xnai status` shows the restart and its cause
    status = run_xnai(["status", "--json"], settings)
    assert status.returncode == 0, status.stderr
    restarts = json.loads(status.stdout)["redis"]["restarts"]
    assert restarts["last_10m"] == 1 and restarts["recent"][0]["cause"] == "killed by SIGKILL"
    assert "redis restarted by xnai up 1 time(s)" in run_xnai(["status"], settings).stdout
    # And beat came back: the copilot runs check_services again after the outage
    after = time.time()
    assert settled(lambda: beat_ran_since(settings, after), within_s=60)
    # And Flower's event stream came back: it records a task sent after the outage
    late = client.submit("curation", "nap", seconds=0.0)
    late.get(timeout=BOUND_S)
    info = wait_flower_success(settings, late.id, within_s=60)
    assert info and info["state"] == "SUCCESS", info
