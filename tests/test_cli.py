"""The ``xnai`` CLI against a real stack: output and the exit codes fixed in the README's CLI section."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import run_xnai


def test_submit_wait_prints_the_result_as_json(stack: Stack, stack_settings: Settings) -> None:
    done = run_xnai(["submit", "grok", "echo", "--kwargs", '{"value": {"a": [1, 2]}}', "--wait"], stack_settings)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"a": [1, 2]}


def test_submit_without_wait_prints_the_task_id(stack: Stack, stack_settings: Settings) -> None:
    done = run_xnai(["submit", "cline", "health"], stack_settings)
    assert done.returncode == 0, done.stderr
    assert uuid.UUID(done.stdout.strip())


@pytest.mark.parametrize(
    "args",
    [
        ["submit", "nobody", "health"],
        ["submit", "cline", "no_such_task"],
        ["submit", "cline", "health", "--kwargs", "[1]"],
        ["submit", "cline", "health", "--kwargs", "{bad json"],
        ["worker", "nobody"],
        ["up", "--roles", "cline,nobody"],
        ["bench", "no_such_bench"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2_with_one_line(stack_settings: Settings, args: list[str]) -> None:
    done = run_xnai(args, stack_settings, timeout=30)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_failed_task_exits_4(stack: Stack, stack_settings: Settings) -> None:
    # Given a task that raises in the worker (echo's delay_s is no number; an unknown argument is refused at submit)
    done = run_xnai(["submit", "grok", "echo", "--kwargs", '{"delay_s": "soon"}', "--wait"], stack_settings)
    # Then exit 4 and one line naming the remote error
    assert done.returncode == 4, done.stderr
    assert "ValueError" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_timeout_exits_5(stack: Stack, stack_settings: Settings) -> None:
    done = run_xnai(
        ["submit", "curation", "echo", "--kwargs", '{"delay_s": 4}', "--wait", "--timeout", "1"], stack_settings
    )
    assert done.returncode == 5, done.stderr
    assert "within 1.0 s" in done.stderr


@pytest.mark.parametrize("url", [None, "redis://127.0.0.1:1/0"])
def test_broker_unreachable_exits_6_within_5_seconds(home: Path, url: str | None) -> None:
    # Given no Redis at all: an embedded home with no server, or an external URL nobody listens on
    settings = Settings(home=home, redis_url=url)
    for args in (["submit", "cline", "health", "--wait"], ["status"]):
        # When a command needs the broker
        started = time.monotonic()
        done = run_xnai(args, settings, timeout=30)
        elapsed = time.monotonic() - started
        # Then it fails fast with exit 6 and one clear line, never a hang
        assert done.returncode == 6, (args, done.stderr)
        assert elapsed < 5.0, elapsed
        assert done.stderr.strip().startswith("xnai: broker unreachable")
        assert len(done.stderr.strip().splitlines()) == 1


def test_status_lists_workers_and_queues(stack: Stack, stack_settings: Settings) -> None:
    done = run_xnai(["status", "--json"], stack_settings)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["redis"]["reachable"] and status["redis"]["embedded"]
    for role in ("copilot", "cline", "grok", "curation"):
        assert any(node.startswith(f"{role}@") for node in status["roles"][role]["workers"])
        assert isinstance(status["roles"][role]["queued"], int)
    text = run_xnai(["status"], stack_settings)
    assert text.returncode == 0 and "cline@" in text.stdout
