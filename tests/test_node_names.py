"""A role worker's node name must be one its Redis user may control: ``ROLE@NAME`` (or Celery's ``celery@HOST``).

Its control queue is ``NODE.celery.pidbox`` and the role's ACL allows only ``ROLE@*`` (and ``celery@*``) ones:
any other name is refused at start in one line, exit 2, before the worker connects.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from celery import Celery

from xnai_tasks.core.nodes import workers_online
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import short_home


@pytest.fixture(scope="module")
def private_settings() -> Iterator[Settings]:
    yield Settings(home=short_home(), model_mode="lazy", llm_safe="off")


def celery_worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XNAI_")}
    env.update(settings.to_env())
    return env


def celery_worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "xnai_tasks", "worker", "-Q", "curation", "-c", "1", *args]


def test_a_worker_named_outside_its_role_is_refused_before_it_connects(
    private_stack: Stack, private_settings: Settings
) -> None:
    # Given the embedded Redis, whose curation user may control only curation@* (and celery@*) nodes
    assert private_stack.redis is not None
    admin = private_stack.redis.client()
    admin.execute_command("ACL", "LOG", "RESET")
    # When a second curation worker is started under another name
    started = time.monotonic()
    done = subprocess.run(
        celery_worker("-n", "extra@%h"),
        env=celery_worker_env(private_settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Then it exits at once with the usage code and one line stating the rule
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    host = socket.gethostname()
    assert lines == [
        f'xnai: a curation worker\'s node name must start with "curation@" (got "extra@{host}"): '
        "use -n curation@NAME, or no -n"
    ]
    assert time.monotonic() - started < 30
    # And it never reached Redis: nothing was denied to the curation user
    assert [entry for entry in admin.acl_log() if entry.get("username") == "curation"] == []
    admin.close()


def test_a_worker_named_role_at_anything_serves(
    private_stack: Stack, private_settings: Settings, private_app: Celery
) -> None:
    # Given a second curation worker named curation@extra
    proc = subprocess.Popen(
        celery_worker("-n", "curation@extra"),
        env=celery_worker_env(private_settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # Then it answers the signed ping under that name
        deadline = time.monotonic() + 90
        while "curation@extra" not in workers_online(private_app).get("curation", []):
            assert proc.poll() is None, f"the worker exited with code {proc.returncode}"
            assert time.monotonic() < deadline, "curation@extra never answered ping"
            time.sleep(0.5)
        # And it stops cleanly
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
